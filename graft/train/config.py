"""The training recipe: dataclass sections, loaded from YAML, validated, overridable by dotted keys.

    recipe = load_recipe("recipes/classification.yaml", ["optim.lr=3e-5", "train.epochs=2"])
    recipe.optim.lr          # 3e-05
    recipe.to_dict()         # the resolved recipe, as written to the run folder

Every number has a range and every name its choices, declared next to the field (``ranged``,
``one_of``) and checked at load. A bad key or value is a one-line GraftError that names the key and
who wrote it (the file, or the override), and suggests the full dotted key for a misspelled one.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from graft.data import FORMATS, DataSpec
from graft.data.records import LABEL_KINDS
from graft.errors import GraftError, closest, coerce, did_you_mean, shown
from graft.strategies import parse_strategy
from graft.tasks import HEADS
from graft.vision import AUGMENTS

# graft.train.build still imports the hint under its old name; graft.errors.did_you_mean is the one to use.
suggest = did_you_mean

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("linear", "cosine", "constant", "step")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")  # the model's weights; mixed precision is train.precision
# how processes share the training (a "strategy" is graft.strategies' transfer strategy)
DISTRIBUTED_MODES = ("auto", "none", "ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
MODES = ("auto", "min", "max")
DIRECTIONS = ("auto", "minimize", "maximize")
PRUNERS = ("median", "none")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
TOKENS_MAX = 2**31 - 1  # the tokenizer's truncation length is a 32-bit int


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None

    def __contains__(self, x: float) -> bool:
        return not (
            (self.low is not None and x < self.low)
            or (self.high is not None and x > self.high)
            or (self.above is not None and x <= self.above)
            or (self.below is not None and x >= self.below)
        )

    def __str__(self) -> str:
        lower = f"[{self.low}" if self.low is not None else f"({self.above}" if self.above is not None else ""
        upper = (
            f"{self.high}]" if self.high is not None else f"{self.below})" if self.below is not None else ""
        )
        if lower and upper:
            return f"in {lower}, {upper}"
        if lower:
            return (">= " if lower[0] == "[" else "> ") + lower[1:]
        return ("<= " if upper[-1] == "]" else "< ") + upper[:-1]


def ranged(default: Any, **bounds: float) -> Any:
    """A numeric field and its range (for a list, the range of each item), checked at load."""
    metadata = {"range": Range(**bounds)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def one_of(default: Any, choices: tuple[str, ...]) -> Any:
    """A field whose text value must be one of ``choices``, checked at load."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class ModelSection:
    path: str = ""  # a Hugging Face-format folder or Hub id
    dtype: str = one_of("float32", DTYPES)  # weights' dtype; mixed precision is train.precision
    kernels: bool = True  # graft's CPU kernels (graft.kernels); false: graft.nn's plain reference code


@dataclass
class DataSection(DataSpec):
    max_length: int = ranged(128, low=1, high=TOKENS_MAX)  # tokens per example after truncation
    # images in training: a random resized crop over crop_scale of the area and a flip, a flip, or none
    augment: str = one_of("crop+flip", AUGMENTS)
    crop_scale: list[float] = ranged([0.08, 1.0], above=0, high=1)

    # The fields DataSpec declares (graft.data knows nothing of recipes).
    checks: ClassVar[dict[str, dict[str, Any]]] = {
        "val_fraction": {"range": Range(low=0, below=1)},
        "test_fraction": {"range": Range(low=0, below=1)},
        "seed": {"range": Range(low=0, high=SEED_MAX)},
        "label_kind": {"choices": LABEL_KINDS},
        "format": {"choices": tuple(FORMATS)},
    }


@dataclass
class TaskSection:
    name: str = one_of("classification", tuple(HEADS))
    label_smoothing: float = ranged(0.0, low=0, below=1)
    # "balanced" or one weight per class
    class_weights: str | list[float] | None = field(
        default=None, metadata={"choices": ("balanced",), "range": Range(low=0)}
    )
    focal_gamma: float = ranged(0.0, low=0)  # > 0: focal loss (down-weights easy examples)
    # seq2seq: how evaluation generates the texts that ROUGE, BLEU and chrF score
    max_new_tokens: int = ranged(64, low=1)
    num_beams: int = ranged(1, low=1)


@dataclass
class StrategySection:
    name: str = (
        "full"  # how much of the model trains: a strategy of graft.strategies, checked with its options
    )
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    name: str = one_of("adamw", OPTIMIZERS)
    lr: float = ranged(5e-5, above=0)
    weight_decay: float = ranged(0.01, low=0)  # never applied to biases and norm weights
    betas: list[float] = ranged([0.9, 0.999], low=0, below=1)
    eps: float = ranged(1e-8, above=0)
    momentum: float = ranged(0.9, low=0, below=1)  # sgd
    nesterov: bool = False  # sgd


@dataclass
class ScheduleSection:
    name: str = one_of("linear", SCHEDULES)  # the decay after warm-up
    warmup_steps: int = ranged(0, low=0)
    warmup_ratio: float = ranged(0.0, low=0, high=1)  # of all optimizer steps; used when warmup_steps is 0
    min_lr_ratio: float = ranged(0.0, low=0, high=1)  # linear/cosine decay to lr * min_lr_ratio
    step_size: int = ranged(1000, low=1)  # step: multiply by gamma every step_size steps
    gamma: float = ranged(0.1, above=0, high=1)


@dataclass
class TrainSection:
    output: str = "runs/run"  # the run folder
    epochs: float = ranged(1.0, above=0)
    max_steps: int = ranged(0, low=0)  # > 0: stop after this many optimizer steps
    batch_size: int = ranged(16, low=1)  # examples per micro-batch on each process
    accumulate: int = ranged(1, low=1)  # micro-batches per optimizer step
    precision: str = one_of("fp32", PRECISIONS)  # fp16 needs CUDA (with loss scaling)
    clip_norm: float = ranged(1.0, low=0)  # global gradient norm; 0 = no clipping
    seed: int = ranged(0, low=0, high=SEED_MAX)
    group_by_length: bool = False  # batch examples of similar length: less padding
    curriculum_epochs: int = ranged(0, low=0)  # the first N epochs go from short to long examples
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    log_every: int = ranged(1, low=1)
    plots: bool = True  # PNG plots of loss, learning rate and metrics at the end
    device: str = one_of("auto", DEVICES)


@dataclass
class EvalSection:
    every: int = ranged(0, low=0)  # evaluate every N optimizer steps; 0 = at the end of each epoch
    batch_size: int = ranged(32, low=1)
    metric: str = "loss"  # the metric that picks the best model
    mode: str = one_of("auto", MODES)  # auto: min for losses and errors, max otherwise


@dataclass
class EarlyStoppingSection:
    patience: int = ranged(0, low=0)  # evaluations without improvement before stopping; 0 = never stop early
    metric: str = ""  # "" = eval.metric
    mode: str = one_of("auto", MODES)
    threshold: float = ranged(0.0, low=0)  # an improvement smaller than this does not count


@dataclass
class CheckpointSection:
    every: int = ranged(0, low=0)  # save every N optimizer steps; 0 = at the end of each epoch
    keep: int = ranged(2, low=0)  # the last K checkpoints (the best one is kept as well); 0 = write none
    keep_best: bool = True
    save_model: bool = True  # write the final (best when tracked) model as a HF folder


@dataclass
class DistributedSection:
    mode: str = one_of("auto", DISTRIBUTED_MODES)  # auto: ddp when launched by torchrun
    backend: str = one_of("auto", BACKENDS)  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False


@dataclass
class TuneSection:
    trials: int = ranged(10, low=1)
    metric: str = ""  # "" = eval.metric
    direction: str = one_of("auto", DIRECTIONS)
    pruner: str = one_of("median", PRUNERS)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted key -> {type, low, high, ...}


@dataclass
class DistillSection:
    """graft distill: a student learns from a teacher (graft.compress.distill)."""

    teacher: str = ""  # a fine-tuned task model folder or Hub id
    # the student, one of: the teacher's layers kept (these, every k-th, or the first N), weights
    # copied; a fresh config (keys of graft's TransformerConfig: num_layers, hidden_size...); model.path
    layers: list[int] = ranged([], low=0)  # (and below the teacher's depth, checked when it loads)
    every: int = ranged(0, low=0)
    first: int = ranged(0, low=0)
    student: dict[str, Any] = field(default_factory=dict)
    temperature: float = ranged(2.0, above=0)
    soft: float = ranged(0.5, low=0)  # weight of the KL to the teacher's soft targets (times T^2)
    hard: float = ranged(0.5, low=0)  # weight of the data labels' loss
    hidden: float = ranged(0.0, low=0)  # weight of the hidden-state MSE (TinyBERT)
    attention: float = ranged(0.0, low=0)  # weight of the last layer's attention KL (MiniLM)
    value: float = ranged(0.0, low=0)  # weight of the last layer's value-relation KL (MiniLM)
    transfer: str = ""  # unlabelled text: more training examples, labelled by the teacher


# masked LM (encoders), causal LM (decoders), T5's span corruption (encoder-decoders), ELECTRA's
# replaced-token detection (encoders: a small generator and the discriminator)
OBJECTIVES = ("mlm", "clm", "span-corruption", "electra")


@dataclass
class PretrainSection:
    """graft pretrain: (continued) pretraining on raw text, streamed (graft.pretrain)."""

    objective: str = one_of("mlm", OBJECTIVES)
    files: list[str] = field(default_factory=list)  # .txt (a document per non-empty line) or .jsonl ("text")
    mask_probability: float = ranged(0.15, above=0, below=1)  # mlm: the share of tokens (or words) masked
    whole_word: bool = False  # mlm: mask every piece of a chosen word
    # clm, mlm, electra: several documents per row, each attending only to itself (false: a document
    # per row, padded, a long one in consecutive windows of max_length); span corruption refuses false
    # (it joins documents end to end)
    pack: bool = True
    noise_density: float = ranged(0.15, above=0, below=1)  # span-corruption: the share of tokens in spans
    mean_span_length: float = ranged(3.0, low=1)  # span-corruption: the mean length of a dropped span
    generator_layers: int = ranged(0, low=0)  # electra: the generator's depth (0: a third of the model's)
    disc_weight: float = ranged(50.0, above=0)  # electra: loss = generator MLM + disc_weight x RTD BCE


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
    distill: DistillSection = field(default_factory=DistillSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        return build(cls, data, source)

    def check(self, source: str = "recipe", origins: dict[str, str] | None = None) -> Recipe:
        """What no single field can say: values that depend on each other, the strategy and its options.

        Each field's own type, range and choices are checked by ``build``; ``origins`` names the
        override that set a key, to blame it instead of ``source``.
        """

        def fail(key: str, message: str) -> typing.NoReturn:
            raise GraftError(f"{origin(key, source, origins)}: {key}: {message}")

        if len(self.optim.betas) != 2:
            fail("optim.betas", f"expected two numbers [beta1, beta2], got {shown(self.optim.betas)}")
        if self.optim.name == "sgd" and self.optim.nesterov and self.optim.momentum == 0:
            fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")
        if len(self.data.crop_scale) != 2 or self.data.crop_scale[0] > self.data.crop_scale[1]:
            fail(
                "data.crop_scale", f"expected [low, high] with low <= high, got {shown(self.data.crop_scale)}"
            )
        if not self.data.label_delimiter:
            fail("data.label_delimiter", "must not be empty")
        try:
            parse_strategy(self.strategy.name, self.strategy.options)
        except GraftError as e:  # "strategy 'lora': option 'r' must be positive, got 0"
            where = origin("strategy.options", source, origins)
            raise GraftError(f"{origin('strategy.name', where, origins)}: {e}") from None
        d = self.distill
        if d.teacher and d.soft + d.hard + d.hidden + d.attention + d.value == 0:
            fail(
                "distill.soft",
                "every distillation loss weight is 0 (distill.soft, hard, hidden, attention, value)",
            )
        if not self.pretrain.pack and self.pretrain.objective == "span-corruption":
            fail(
                "pretrain.pack",
                "span-corruption joins documents end to end and does not read it (remove it)",
            )
        if self.tune.space:
            check_space(self.tune.space, origin("tune.space", source, origins))
        return self


# Names that transformers' TrainingArguments (and habit) give to recipe keys.
ALIASES = {
    "learning_rate": "optim.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "warmup_ratio": "schedule.warmup_ratio",
    "warmup_steps": "schedule.warmup_steps",
    "lr_scheduler_type": "schedule.name",
    "max_grad_norm": "train.clip_norm",
    "gradient_accumulation_steps": "train.accumulate",
    "seed": "train.seed",
    "max_steps": "train.max_steps",
    "output_dir": "train.output",
    "logging_steps": "train.log_every",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "torch_compile": "train.compile",
    "use_cpu": "train.device",
    "eval_steps": "eval.every",
    "metric_for_best_model": "eval.metric",
    "greater_is_better": "eval.mode",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "label_smoothing_factor": "task.label_smoothing",
    "early_stopping_patience": "early_stopping.patience",
    "early_stopping_threshold": "early_stopping.threshold",
    "model_name_or_path": "model.path",
    "max_seq_length": "data.max_length",
    "ddp_backend": "distributed.backend",
    "ddp_find_unused_parameters": "distributed.find_unused_parameters",
    "distributed.strategy": "distributed.mode",  # its name before "strategy" meant graft.strategies only
}


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the recipe, sections and fields: 'model', 'model.path', ..."""
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += recipe_keys(hint, f"{prefix}{f.name}.")
    return keys


def key_hint(key: str) -> str:
    """'; did you mean ...?' for an unknown dotted key, always with the full key: a typo at any level
    ('chekpoint.keep' -> 'checkpoint.keep'), a transformers name ('learning_rate' -> 'optim.lr'),
    or a field in the wrong section ('train.lr' -> 'optim.lr')."""
    fields = {}  # a field's own name -> its dotted key (the first section that has it)
    for k in recipe_keys():
        fields.setdefault(k.rsplit(".", 1)[-1], k)
    if key in ALIASES:  # a renamed key: its new name, not a field that shares its last part
        return did_you_mean(key, (), ALIASES)
    table = {**fields, **ALIASES}
    last = key.rsplit(".", 1)[-1]
    if last in table:  # a known name in the wrong place
        return did_you_mean(last, (), table)
    # each name corrected against those of its level
    cls: Any = Recipe
    fixed = []
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        name = closest(part, names)
        if name is None:
            return did_you_mean(last, (), table)
        fixed.append(name)
        cls = typing.get_type_hints(cls)[name]
    return did_you_mean(key, (), {key: ".".join(fixed)})  # the corrected key, as an alias of the given one


def origin(key: str, source: str, origins: dict[str, str] | None) -> str:
    """Who set ``key``: the override that set it or a section above it, else ``source`` (the file)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        found = (origins or {}).get(".".join(parts[:i]))
        if found:
            return found
    return source


def build(cls: type, data: Any, source: str, prefix: str = "", origins: dict[str, str] | None = None) -> Any:
    """An instance of dataclass ``cls`` from a mapping, with every key, type, range and choice checked.

    ``source`` names the file for errors; ``prefix`` is the dotted path of this section;
    ``origins`` maps the keys that overrides set to the override's text.
    """
    section = prefix.rstrip(".")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = origin(section, source, origins) if section else source
        raise GraftError(f"{where}: {section or 'recipe'}: expected a mapping of keys, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise GraftError(f"{source}: unknown key {shown(dotted)}{key_hint(str(dotted))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build(hint, value, source, dotted + ".", origins)
            continue
        where = origin(dotted, source, origins)
        values[key] = coerce(value, hint, f"{where}: {dotted}")
        checks = {**getattr(cls, "checks", {}).get(key, {}), **fields[key].metadata}
        check_value(values[key], checks, f"{where}: {dotted}")
    try:
        return cls(**values)
    except GraftError as e:  # a section's own checks (DataSpec's): "columns: ..." or "data.seed: ..."
        message = str(e) if str(e).startswith(section) else f"{prefix}{e}"
        raise GraftError(f"{origin(message.split(':')[0], source, origins)}: {message}") from None


def check_value(value: Any, checks: dict[str, Any], where: str) -> None:
    """A coerced value against its field's ``range`` (each item of a list) and ``choices``."""
    if "choices" in checks and isinstance(value, str) and value not in checks["choices"]:
        choices = checks["choices"]
        raise GraftError(
            f"{where}: unknown value {shown(value)} (one of {', '.join(choices)}){did_you_mean(value, choices)}"
        )
    bounds = checks.get("range")
    if bounds is None or isinstance(value, (str, bool)) or value is None:
        return
    for i, x in enumerate(value if isinstance(value, list) else [value]):
        if x not in bounds:
            item = f"[{i}]" if isinstance(value, list) else ""
            raise GraftError(f"{where}{item}: must be {bounds}, got {shown(x)}")


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> Any:
    """data["a"]["b"] = value for key "a.b", checking each name against the recipe's sections.

    Returns the type the key holds (Any inside free-form mappings).
    """
    parts = key.split(".")
    cls: Any = Recipe
    node = data
    hint: Any = Any
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cls is None:  # inside a free-form mapping (strategy.options, tune.space): any key
            hint = Any
        else:
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise GraftError(f"{where}: unknown key {shown(key)}{key_hint(key)}")
            hint = typing.get_type_hints(cls)[part]
            if not last and not dataclasses.is_dataclass(hint) and typing.get_origin(hint) is not dict:
                raise GraftError(
                    f"{where}: unknown key {shown(key)} ({'.'.join(parts[: i + 1])} holds a value)"
                )
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            cls = hint if dataclasses.is_dataclass(hint) else None
    return hint


def parse_override(text: str) -> tuple[str, Any, str]:
    """``key=value`` as (key, the value read as YAML, the value's text)."""
    if "=" not in text:
        raise GraftError(f"override {shown(text)}: expected KEY=VALUE, e.g. optim.lr=3e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except Exception:  # not YAML (PyYAML's constructors also raise ValueError and others): the text itself
        value = raw
    return key.strip(), value, raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraftError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise GraftError(f"{path}: is a folder, not a recipe file") from None
    except UnicodeDecodeError as e:
        raise GraftError(f"{path}: a recipe is UTF-8 text (byte {e.start + 1}: {e.reason})") from None
    except OSError as e:
        raise GraftError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise GraftError(f"{path}{line}: not valid YAML ({problem})") from None
    except Exception as e:  # PyYAML's constructors raise ValueError, AttributeError... on bad tagged values
        raise GraftError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GraftError(f"{path}: a recipe is a mapping of sections (model, data, train...)")
    return data


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Recipe:
    """A validated Recipe from a YAML file (or ``base``), with ``key=value`` overrides applied.

    An error in a value names the override that set it ("override optim.lr=abc: ..."), else the file.
    """
    data = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    where = str(path) if path is not None else "recipe"
    origins: dict[str, str] = {}
    for text in overrides or []:
        key, value, raw = parse_override(text)
        said = f"override {text if text.isprintable() else shown(text)}"
        hint = set_dotted(data, key, value, said)
        if hint in (str, str | None) and not isinstance(value, str):
            set_dotted(
                data, key, raw, said
            )  # text as typed: 'train.output=2024-01-01' is a folder, not a date
        for k in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[k]  # the last override of a key is the one to blame
        origins[key] = said
    return build(Recipe, data, where, origins=origins).check(where, origins)


def with_overrides(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with dotted keys set (hyperparameter search)."""
    data = recipe.to_dict()
    origins = {}
    for key, value in values.items():
        origins[key] = f"key {key}={shown(value)}"
        set_dotted(data, key, value, origins[key])
    return build(Recipe, data, "recipe", origins=origins).check("recipe", origins)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


SPACE_TYPES = ("float", "int", "categorical")


def check_space(space: dict[str, Any], where: str = "recipe") -> None:
    """tune.space: each key a recipe key, each entry a float/int range or a list of choices."""
    for key, spec in space.items():
        at = f"{where}: tune.space.{key}"
        set_dotted({}, str(key), None, f"{where}: tune.space")  # the key must exist in the recipe
        if not isinstance(spec, dict):
            raise GraftError(f"{at}: expected a mapping like {{type: float, low: ..., high: ...}}")
        kind = spec.get("type", "float")
        if kind not in SPACE_TYPES:
            raise GraftError(
                f"{at}.type: unknown value {shown(kind)} (one of {', '.join(SPACE_TYPES)})"
                f"{did_you_mean(str(kind), SPACE_TYPES)}"
            )
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        for name in spec:
            if name not in allowed:
                raise GraftError(
                    f"{at}: unknown key {shown(name)} for a {kind}{did_you_mean(str(name), allowed)}"
                )
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise GraftError(f"{at}.choices: expected a list of values, got {shown(choices)}")
            continue
        number = int if kind == "int" else float
        for name in ("low", "high"):
            if name not in spec:
                raise GraftError(f"{at}: a {kind} needs {name!r}")
        low = coerce(spec["low"], number, f"{at}.low")
        high = coerce(spec["high"], number, f"{at}.high")
        log = coerce(spec.get("log", False), bool, f"{at}.log")
        step = coerce(spec.get("step"), number | None, f"{at}.step")
        if low > high:
            raise GraftError(f"{at}: low ({low}) is above high ({high})")
        if log and low <= 0:
            raise GraftError(f"{at}: a log scale needs low > 0, got {low}")
        if step is not None and (step <= 0 or log):
            raise GraftError(f"{at}.step: must be > 0 and without log, got {step}")
