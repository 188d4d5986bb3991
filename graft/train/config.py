"""The training recipe: dataclass sections, loaded from YAML, validated, overridable by dotted keys.

    recipe = load_recipe("recipes/classification.yaml", ["optim.lr=3e-5", "train.epochs=2"])
    recipe.optim.lr          # 3e-05
    recipe.to_dict()         # the resolved recipe, as written to the run folder

A misspelled key anywhere is a one-line GraftError that names the file and suggests the right key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graft.data import DataSpec
from graft.errors import GraftError

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("linear", "cosine", "constant", "step")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
STRATEGIES = ("auto", "none", "ddp", "fsdp")
MODES = ("auto", "min", "max")


@dataclass
class ModelSection:
    path: str = ""  # a Hugging Face-format folder or Hub id
    dtype: str = "float32"  # weights' dtype; mixed precision is train.precision


@dataclass
class DataSection(DataSpec):
    max_length: int = 128  # tokens per example after truncation


@dataclass
class TaskSection:
    name: str = "classification"  # a key of graft.tasks.HEADS
    label_smoothing: float = 0.0
    class_weights: str | list[float] | None = None  # "balanced" or one weight per class
    focal_gamma: float = 0.0  # > 0: focal loss (down-weights easy examples)


@dataclass
class StrategySection:
    name: str = "full"  # how much of the model trains; graft.strategies fills this in
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw | adafactor | sgd
    lr: float = 5e-5
    weight_decay: float = 0.01  # never applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd


@dataclass
class ScheduleSection:
    name: str = "linear"  # linear | cosine | constant | step: the decay after warm-up
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of all optimizer steps; used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # linear/cosine decay to lr * min_lr_ratio
    step_size: int = 1000  # step: multiply by gamma every step_size steps
    gamma: float = 0.1


@dataclass
class TrainSection:
    output: str = "runs/run"  # the run folder
    epochs: float = 1.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps
    batch_size: int = 16  # examples per micro-batch on each process
    accumulate: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA, with loss scaling) | auto
    clip_norm: float = 1.0  # global gradient norm; 0 = no clipping
    seed: int = 0
    group_by_length: bool = False  # batch examples of similar length: less padding
    curriculum_epochs: int = 0  # the first N epochs go from short to long examples
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    log_every: int = 1
    plots: bool = True  # PNG plots of loss, learning rate and metrics at the end
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalSection:
    every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    batch_size: int = 32
    metric: str = "loss"  # the metric that picks the best model
    mode: str = "auto"  # auto: min for losses and errors, max otherwise


@dataclass
class EarlyStoppingSection:
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    metric: str = ""  # "" = eval.metric
    mode: str = "auto"
    threshold: float = 0.0  # an improvement smaller than this does not count


@dataclass
class CheckpointSection:
    every: int = 0  # save every N optimizer steps; 0 = at the end of each epoch
    keep: int = 2  # the last K checkpoints (the best one is kept as well); 0 = write none
    keep_best: bool = True
    save_model: bool = True  # write the final (best when tracked) model as a HF folder


@dataclass
class DistributedSection:
    strategy: str = "auto"  # auto (ddp when launched by torchrun) | none | ddp | fsdp
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False


@dataclass
class TuneSection:
    trials: int = 10
    metric: str = ""  # "" = eval.metric
    direction: str = "auto"  # auto | minimize | maximize
    pruner: str = "median"  # median | none
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted key -> {type, low, high, ...}


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    task: TaskSection = field(default_factory=TaskSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    tune: TuneSection = field(default_factory=TuneSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        return build(cls, data, source)

    def check(self, source: str = "recipe") -> Recipe:
        """Values that must be one of a few names."""
        for key, value, allowed in (
            ("optim.name", self.optim.name, OPTIMIZERS),
            ("schedule.name", self.schedule.name, SCHEDULES),
            ("train.precision", self.train.precision, PRECISIONS),
            ("distributed.strategy", self.distributed.strategy, STRATEGIES),
            ("eval.mode", self.eval.mode, MODES),
            ("early_stopping.mode", self.early_stopping.mode, MODES),
        ):
            if value not in allowed:
                raise GraftError(
                    f"{source}: {key}: unknown value {value!r}{suggest(value, allowed)} (one of {', '.join(allowed)})"
                )
        for key, value in (
            ("train.batch_size", self.train.batch_size),
            ("train.accumulate", self.train.accumulate),
        ):
            if value < 1:
                raise GraftError(f"{source}: {key}: must be at least 1, got {value}")
        if self.optim.lr <= 0:
            raise GraftError(f"{source}: optim.lr: must be positive, got {self.optim.lr}")
        return self


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a mapping, with every key and value type checked.

    ``source`` names the file for errors; ``prefix`` is the dotted path of this section.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GraftError(
            f"{source}: {prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise GraftError(
                f"{source}: unknown key {dotted!r}{suggest(dotted, [prefix + n for n in names])}"
            )
        values[key] = coerce(value, hints[key], source, dotted)
    try:
        return cls(**values)
    except GraftError as e:
        raise GraftError(f"{source}: {e}") from None


def coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """``value`` as type ``hint`` (YAML reads 3e-5 as text; a command line gives only text)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, source, key)
            except GraftError as e:
                errors.append(str(e))
        raise GraftError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise GraftError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise GraftError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(hint, "__name__", str(hint))
    raise GraftError(f"{source}: {key}: expected {name}, got {value!r}")


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """data["a"]["b"] = value for key "a.b", checking each name against the recipe's sections."""
    parts = key.split(".")
    cls: Any = Recipe
    node = data
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            # Free-form mappings (strategy.options, tune.space) take any key.
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            raise GraftError(f"{where}: unknown key {key!r}{suggest(key, full)}")
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            cls = hint if dataclasses.is_dataclass(hint) else None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise GraftError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraftError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise GraftError(f"{path}: is a folder, not a recipe file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise GraftError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GraftError(f"{path}: a recipe is a mapping of sections (model, data, train...)")
    return data


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Recipe:
    """A validated Recipe from a YAML file (or ``base``), with ``key=value`` overrides applied."""
    data = read_yaml(path) if path is not None else dict(base or {})
    where = str(path) if path is not None else "recipe"
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value, f"override {text!r}")
    recipe = build(Recipe, data, where)
    return recipe.check(where)


def with_overrides(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with dotted keys set (hyperparameter search)."""
    data = recipe.to_dict()
    for key, value in values.items():
        set_dotted(data, key, value, f"key {key!r}")
    return build(Recipe, data, "recipe").check()


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
