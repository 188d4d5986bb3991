"""Recipe values: every number has a range, every name its choices, every error one line naming the key
and who set it (the file or the override), with a did-you-mean that gives the full dotted key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from graft.errors import GraftError, coerce, did_you_mean
from graft.strategies import parse_strategy
from graft.train.config import ALIASES, Range, Recipe, dump_recipe, load_recipe, recipe_keys

ROOT = Path(__file__).resolve().parents[1]


def sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(Recipe)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Recipe)]


def field_checks(cls: type, f: dataclasses.Field) -> dict:
    return {**getattr(cls, "checks", {}).get(f.name, {}), **f.metadata}


def is_numeric(hint) -> bool:
    """int, float, or a union / list holding them (bool is not a number here)."""
    if hint in (int, float):
        return True
    return any(is_numeric(a) for a in typing.get_args(hint))


def numeric_fields() -> list[tuple[str, type, dataclasses.Field]]:
    found = []
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        found += [(f"{name}.{f.name}", cls, f) for f in dataclasses.fields(cls) if is_numeric(hints[f.name])]
    return found


def load(tmp_path, text: str, overrides: list[str] = ()) -> Recipe:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return load_recipe(path, list(overrides))


def error_of(tmp_path, text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(GraftError) as caught:
        load(tmp_path, text, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message.replace(str(tmp_path / "recipe.yaml"), "recipe.yaml")


# ---- faults 6 and 7: values that crashed later or were accepted silently ---------------------------

BAD_VALUES = [
    # (key, value, what the message says after "KEY: ")
    ("train.log_every", "0", "must be >= 1, got 0"),  # was a ZeroDivisionError
    ("eval.batch_size", "0", "must be >= 1, got 0"),
    ("train.seed", "-1", "must be in [0, 4294967295], got -1"),
    ("optim.lr", "nan", "expected a finite number, got 'nan'"),
    ("optim.lr", ".inf", "expected a finite number, got inf"),
    ("data.max_length", "-5", "must be in [1, 2147483647], got -5"),  # was an OverflowError
    ("model.dtype", "int8", "unknown value 'int8' (one of float32, bfloat16, float16)"),  # was a TypeError
    ("train.device", "tpu", "unknown value 'tpu' (one of auto, cpu, cuda); did you mean 'cpu'?"),
    ("train.epochs", "-1", "must be > 0, got -1.0"),  # trained zero steps and saved the model
    ("data.max_length", "0", "must be in [1, 2147483647], got 0"),
    ("checkpoint.every", "-1", "must be >= 0, got -1"),
    ("eval.every", "-3", "must be >= 0, got -3"),
    ("checkpoint.keep", "-1", "must be >= 0, got -1"),
    ("schedule.warmup_ratio", "2", "must be in [0, 1], got 2.0"),
    ("train.clip_norm", "-1", "must be >= 0, got -1.0"),
    ("optim.betas", "[0.9, 1.5]", "[1]: must be in [0, 1), got 1.5"),
    ("optim.betas", "[0.9]", "expected two numbers [beta1, beta2], got [0.9]"),
    ("train.batch_size", "2.5", "expected int, got 2.5"),
    ("train.batch_size", "true", "expected int, got True"),
    ("train.precision", "bf61", "unknown value 'bf61' (one of fp32, bf16, fp16, auto); did you mean 'bf16'?"),
    ("task.class_weights", "[1, -2]", "[1]: must be >= 0, got -2.0"),
    ("task.class_weights", "balance", "unknown value 'balance' (one of balanced); did you mean 'balanced'?"),
]


def tail(message: str) -> str:
    return message if message.startswith("[") else f": {message}"  # optim.betas[1]: ...


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path, key, value, message):
    section, name = key.split(".")
    assert error_of(tmp_path, f"{section}:\n  {name}: {value}\n") == f"recipe.yaml: {key}{tail(message)}"


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_a_bad_override_names_the_override_not_the_file(tmp_path, key, value, message):
    override = f"{key}={value}"
    assert (
        error_of(tmp_path, "train: {epochs: 1}\n", [override]) == f"override {override}: {key}{tail(message)}"
    )


def test_an_override_is_blamed_for_a_value_it_could_not_read(tmp_path):
    assert (
        error_of(tmp_path, "", ["optim.lr=abc"])
        == "override optim.lr=abc: optim.lr: expected float, got 'abc'"
    )
    # the file's own bad value is the file's; an override that sets it again takes the blame, or fixes it
    assert error_of(tmp_path, "optim: {lr: abc}\n", ["train.epochs=2"]).startswith("recipe.yaml: optim.lr:")
    assert error_of(tmp_path, "optim: {lr: abc}\n", ["optim.lr=-1"]).startswith(
        "override optim.lr=-1: optim.lr:"
    )
    assert load(tmp_path, "optim: {lr: abc}\n", ["optim.lr=1e-4"]).optim.lr == 1e-4
    # a whole section set by an override
    assert (
        error_of(tmp_path, "", ["optim={lr: 0}"]) == "override optim={lr: 0}: optim.lr: must be > 0, got 0.0"
    )


def test_a_text_field_takes_the_override_as_typed(tmp_path):
    recipe = load(
        tmp_path, "", ["train.output=2024-01-01", "model.path=yes", "eval.metric=1e3", "data.train=null"]
    )
    assert (recipe.train.output, recipe.model.path, recipe.eval.metric) == ("2024-01-01", "yes", "1e3")
    assert recipe.data.train is None
    assert load(tmp_path, "", ["train.output='my runs/a'"]).train.output == "my runs/a"  # YAML quotes


def test_strategy_and_its_options_are_checked_at_load(tmp_path):
    assert error_of(tmp_path, "strategy: {name: lroa}\n").startswith("recipe.yaml: strategy 'lroa': unknown")
    assert error_of(tmp_path, "strategy: {name: lroa}\n").endswith("; did you mean 'lora'?")
    message = error_of(tmp_path, "strategy: {name: lora}\n", ["strategy.options={r: 0}"])
    assert message == "override strategy.options={r: 0}: strategy 'lora': option 'r' must be positive, got 0"
    assert load(tmp_path, "", ["strategy.name=lora", "strategy.options={r: 4}"]).strategy.options == {"r": 4}


def test_nesterov_needs_momentum(tmp_path):
    text = "optim: {name: sgd, nesterov: true, momentum: 0}\n"
    assert (
        error_of(tmp_path, text) == "recipe.yaml: optim.nesterov: Nesterov momentum needs optim.momentum > 0"
    )


@pytest.mark.parametrize(
    "space,message",
    [
        ("{optim.lr: {low: a, high: 1}}", "tune.space.optim.lr.low: expected float, got 'a'"),
        ("{optim.lr: {low: 1, high: 0.1}}", "tune.space.optim.lr: low (1.0) is above high (0.1)"),
        (
            "{optim.lr: {low: 0, high: 1, log: true}}",
            "tune.space.optim.lr: a log scale needs low > 0, got 0.0",
        ),
        (
            "{optim.lr: {type: flaot, low: 0, high: 1}}",
            "(one of float, int, categorical); did you mean 'float'?",
        ),
        (
            "{optim.lr: {low: 0, hihg: 1}}",
            "tune.space.optim.lr: unknown key 'hihg' for a float; did you mean 'high'?",
        ),
        (
            "{train.batch_size: {type: categorical, choices: []}}",
            "choices: expected a list of values, got []",
        ),
        ("{optim.lrr: {low: 0, high: 1}}", "tune.space: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ],
)
def test_the_search_space_is_checked_at_load(tmp_path, space, message):
    assert message in error_of(tmp_path, "", [f"tune.space={space}"])


# ---- every field has a stated range or choices ----------------------------------------------------


def test_every_numeric_field_of_every_section_states_its_range():
    fields = numeric_fields()
    assert len(fields) > 30
    missing = [key for key, cls, f in fields if not isinstance(field_checks(cls, f).get("range"), Range)]
    assert missing == [], f"give these fields a range (graft.train.config.ranged): {missing}"


def outside(bounds: Range, integer: bool) -> list[float]:
    """Values just outside a range, on each side it has."""
    step = 1 if integer else 0.5
    values = []
    if bounds.low is not None:
        values.append(bounds.low - step)
    if bounds.above is not None:
        values.append(bounds.above)
    if bounds.high is not None:
        values.append(bounds.high + step)
    if bounds.below is not None:
        values.append(bounds.below)
    return values


@pytest.mark.parametrize("key,cls,f", numeric_fields(), ids=[k for k, _, _ in numeric_fields()])
def test_each_range_holds_the_default_and_refuses_what_is_outside(tmp_path, key, cls, f):
    bounds = field_checks(cls, f)["range"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    for x in default if isinstance(default, list) else [] if default is None else [default]:
        assert x in bounds, (key, x, str(bounds))
    hint = typing.get_type_hints(cls)[f.name]
    integer = hint is int or hint == list[int]
    is_list = typing.get_origin(hint) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(hint)
    )
    values = outside(bounds, integer)
    assert values, f"{key}: a range with no bound"
    for x in values:
        shown = f"[{x}, {x}]" if is_list else str(x)
        message = error_of(tmp_path, "", [f"{key}={shown}"])
        assert message.startswith(f"override {key}={shown}: {key}"), message
        assert f"must be {bounds}" in message


def choice_fields() -> list[tuple[str, tuple[str, ...], object]]:
    found = []
    for name, cls in sections():
        for f in dataclasses.fields(cls):
            choices = field_checks(cls, f).get("choices")
            if choices:
                found.append((f"{name}.{f.name}", choices, f.default))
    return found


def test_the_choice_fields_are_those_a_user_may_misspell():
    names = {key for key, _, _ in choice_fields()}
    assert {
        "model.dtype",
        "train.device",
        "train.precision",
        "optim.name",
        "schedule.name",
        "task.name",
    } <= names
    assert {"eval.mode", "early_stopping.mode", "distributed.mode", "distributed.backend"} <= names
    assert {"tune.direction", "tune.pruner", "data.format", "data.label_kind", "task.class_weights"} <= names


@pytest.mark.parametrize("key,choices,default", choice_fields(), ids=[k for k, _, _ in choice_fields()])
def test_each_choice_field_refuses_a_misspelling_and_suggests(tmp_path, key, choices, default):
    assert default is None or default in choices
    wrong = choices[0][:-1] + "x" + choices[0][-1]  # one letter too many: close enough for a hint
    message = error_of(tmp_path, "", [f"{key}={wrong}"])
    assert message.startswith(
        f"override {key}={wrong}: {key}: unknown value '{wrong}' (one of {', '.join(choices)})"
    )
    assert message.endswith(f"; did you mean '{choices[0]}'?")


def test_the_shipped_recipes_load_and_round_trip(tmp_path):
    for path in sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "bench" / "recipes").glob("*.yaml")]):
        recipe = load_recipe(path)
        again = tmp_path / path.name
        again.write_text(dump_recipe(recipe), encoding="utf-8")
        assert load_recipe(again) == recipe, path.name


# ---- did you mean: one helper, full dotted keys, transformers names -------------------------------


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        (
            "",
            ["trian.epochs=1"],
            "override trian.epochs=1: unknown key 'trian.epochs'; did you mean 'train.epochs'?",
        ),
        ("", ["chekpoint.keep=1"], "unknown key 'chekpoint.keep'; did you mean 'checkpoint.keep'?"),
        ("chekpoint: {keep: 1}\n", [], "recipe.yaml: unknown key 'chekpoint'; did you mean 'checkpoint'?"),
        ("trian: {epochs: 1}\n", [], "recipe.yaml: unknown key 'trian'; did you mean 'train'?"),
        ("learning_rate: 1.0e-4\n", [], "recipe.yaml: unknown key 'learning_rate'; did you mean 'optim.lr'?"),
        ("optim: {learning_rate: 1}\n", [], "unknown key 'optim.learning_rate'; did you mean 'optim.lr'?"),
        ("", ["num_train_epochs=3"], "unknown key 'num_train_epochs'; did you mean 'train.epochs'?"),
        ("", ["max_grad_norm=1"], "unknown key 'max_grad_norm'; did you mean 'train.clip_norm'?"),
        ("", ["gradient_accumulation_steps=4"], "did you mean 'train.accumulate'?"),
        ("", ["per_device_train_batch_size=8"], "did you mean 'train.batch_size'?"),
        ("train: {lr: 1}\n", [], "unknown key 'train.lr'; did you mean 'optim.lr'?"),  # the wrong section
        ("epoch: 2\n", [], "unknown key 'epoch'; did you mean 'train.epochs'?"),
        ("", ["optim.lr.x=1"], "override optim.lr.x=1: unknown key 'optim.lr.x' (optim.lr holds a value)"),
        ("", ["zzz=1"], "override zzz=1: unknown key 'zzz'"),
        ("", ["eval.0=1"], "override eval.0=1: unknown key 'eval.0'"),  # not 'eval', nor 'eval.every'
    ],
)
def test_an_unknown_key_suggests_the_full_dotted_key(tmp_path, text, overrides, message):
    found = error_of(tmp_path, text, overrides)
    assert message in found
    if message.endswith("'"):  # nothing close: no hint
        assert found == message


def test_every_alias_points_at_a_recipe_key():
    keys = set(recipe_keys())
    assert set(ALIASES.values()) <= keys


def test_did_you_mean():
    assert did_you_mean("adamx", ["adamw", "sgd"]) == "; did you mean 'adamw'?"
    assert did_you_mean("qqq", ["adamw", "sgd"]) == ""
    assert (
        did_you_mean("learning_rate", ["optim.name"], {"learning_rate": "optim.lr"})
        == "; did you mean 'optim.lr'?"
    )


def test_the_hint_is_written_once():
    """One helper per idea: graft.errors.did_you_mean is the only caller of difflib."""
    callers = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "graft").rglob("*.py"))
        if "get_close_matches" in path.read_text(encoding="utf-8")
    ]
    assert callers == ["graft/errors.py"]


# ---- one coercion for recipes and strategy specs --------------------------------------------------


@pytest.mark.parametrize(
    "value,hint,expected",
    [
        ("4", int, 4),
        (4.0, int, 4),
        ("1e3", int, 1000),
        ("3e-5", float, 3e-5),
        (2, float, 2.0),
        ("yes", bool, True),
        ("0", bool, False),
        ("q+v", list[str], ["q", "v"]),
        (["q", "v"], list[str], ["q", "v"]),
        ("none", int | None, None),
        ("", str | None, None),
        ("7", int | None, 7),
        ("balanced", str | list[float] | None, "balanced"),
        ([1, 2], str | list[float] | None, [1.0, 2.0]),
        ({"a": 1}, dict[str, str], {"a": "1"}),
        (3, str, "3"),
    ],
)
def test_coerce_reads_text_and_yaml_values(value, hint, expected):
    got = coerce(value, hint, "k")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value,hint,message",
    [
        ("many", int, "k: expected int, got 'many'"),
        (2.5, int, "k: expected int, got 2.5"),
        (True, int, "k: expected int, got True"),
        ("nan", float, "k: expected a finite number, got 'nan'"),
        (10**400, float, "k: expected a finite number, got 1000000000"),
        ("maybe", bool, "k: expected bool, got 'maybe'"),
        (3, list[str], "k: expected a list ([a, b] or a+b), got 3"),
        (["a", None], list[str], "k[1]: expected str, got None"),
        ("x" * 500, int, "k: expected int, got 'xxxxxxxx"),
        ([1], str, "k: expected str, got [1]"),
        ("a", dict[str, str], "k: expected a mapping, got 'a'"),
    ],
)
def test_coerce_refuses_with_one_short_line(value, hint, message):
    with pytest.raises(GraftError) as caught:
        coerce(value, hint, "k")
    assert str(caught.value).startswith(message) and len(str(caught.value)) < 100


def test_strategy_specs_share_the_recipe_coercion():
    assert parse_strategy("lora:r=4,targets=q+v").targets == ["q", "v"]
    with pytest.raises(GraftError, match="option 'alpha': expected a finite number, got 'nan'"):
        parse_strategy("lora:alpha=nan")  # was accepted: nan <= 0 is False
    with pytest.raises(GraftError, match="unknown \\(known: .*\\); did you mean 'lora'\\?"):
        parse_strategy("lroa")


# ---- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,message",
    [
        (b"train: {epochs: !!float abc}\n", "recipe.yaml: not valid YAML ("),
        (b"train: {epochs: !!timestamp x}\n", "recipe.yaml: not valid YAML ("),
        (b"train: {output: \xff}\n", "recipe.yaml: a recipe is UTF-8 text (byte 17"),
        (b"- 1\n- 2\n", "recipe.yaml: a recipe is a mapping of sections"),
        (b"train: 3\n", "recipe.yaml: train: expected a mapping of keys, got 3"),
    ],
)
def test_a_bad_recipe_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(GraftError) as caught:
        load_recipe(path)
    text = str(caught.value).replace(str(path), "recipe.yaml")
    assert text.startswith(message) and "\n" not in text


def test_an_unreadable_recipe_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text("", encoding="utf-8")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(GraftError, match=r"recipe\.yaml: cannot read the recipe \(Permission denied\)$"):
        load_recipe(path)


# ---- graft tune without optuna --------------------------------------------------------------------


def test_tune_without_optuna_says_which_extra_to_install(tmp_path, monkeypatch):
    from graft.train.tune import run_search

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ModuleNotFoundError
    recipe = load(tmp_path, "tune:\n  space: {optim.lr: {low: 1.0e-5, high: 1.0e-3}}\n")
    with pytest.raises(GraftError) as caught:
        run_search(recipe, run=lambda r, callbacks: {})
    assert (
        str(caught.value) == 'graft tune needs optuna, which is not installed: pip install "graft-ml[train]"'
    )


def test_graft_tune_without_optuna_prints_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("tune:\n  space: {optim.lr: {low: 1.0e-5, high: 1.0e-3}}\n", encoding="utf-8")
    code = (
        "import sys; sys.modules['optuna'] = None; from graft.cli import main; sys.argv[0] = 'graft'; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "tune", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == 'error: graft tune needs optuna, which is not installed: pip install "graft-ml[train]"'
    )
