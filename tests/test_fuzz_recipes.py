"""Fuzzing recipes: random values of random types for every key of every section, unknown keys, and
command-line overrides. Two outcomes only: a valid recipe (which then round-trips through YAML), or a
GraftError of one line that names a key it was given. Never another exception.

Seeded and derandomized: the same examples every run. `pytest -m slow` runs five times as many.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.errors import GraftError
from graft.train.config import Recipe, dump_recipe, load_recipe

SECTIONS = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe)}
FIELDS = {name: [f for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
NAME = st.text("abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=16)


def plausible(f: dataclasses.Field) -> st.SearchStrategy:
    """Values near what the field wants: its default, its choices, numbers around its bounds."""
    checks = {**f.metadata}
    options = [st.just(f.default_factory() if f.default is dataclasses.MISSING else f.default)]
    if "choices" in checks:
        options.append(st.sampled_from(checks["choices"]))
    bounds = checks.get("range")
    if bounds is not None:
        edges = [x for x in (bounds.low, bounds.high, bounds.above, bounds.below) if x is not None]
        near = st.sampled_from(edges).flatmap(lambda x: st.sampled_from([x - 1, x - 0.5, x, x + 0.5, x + 1]))
        options += [near, near.map(int), st.lists(near, max_size=3)]
    return st.one_of(options)


SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-4", "nan", "-inf", "true", "none", "", "a+b", "[1, 2]", "{a: 1}", "0x10", "1_000"]),
)
ANY = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAME, inner, max_size=3), max_leaves=6
)


@st.composite
def recipes(draw) -> dict:
    """A recipe mapping: some sections, each with some of its keys (plausible or random) and maybe an unknown one."""
    data: dict = {}
    for name in draw(st.lists(st.sampled_from(list(SECTIONS)), max_size=4, unique=True)):
        if draw(st.integers(0, 19)) == 0:
            data[name] = draw(SCALAR)  # not a mapping at all
            continue
        section = {}
        for f in draw(st.lists(st.sampled_from(FIELDS[name]), max_size=3, unique_by=lambda f: f.name)):
            section[f.name] = draw(st.one_of(plausible(f), ANY))
        if draw(st.integers(0, 9)) == 0:
            section[draw(NAME)] = draw(SCALAR)
        data[name] = section
    if draw(st.integers(0, 9)) == 0:
        data[draw(NAME)] = draw(SCALAR)
    return data


@st.composite
def overrides(draw) -> list[str]:
    found = []
    for _ in range(draw(st.integers(0, 2))):
        section = draw(st.sampled_from(list(SECTIONS)))
        f = draw(st.sampled_from(FIELDS[section]))
        key = draw(st.one_of(st.just(f"{section}.{f.name}"), NAME))
        value = draw(st.one_of(plausible(f), SCALAR))
        text = draw(st.one_of(st.text(max_size=10), st.just(yaml.safe_dump(value, default_flow_style=True))))
        found.append(f"{key}={text.strip().removesuffix('...').strip()}")
    return found


def named_keys(data: dict, given: list[str]) -> list[str]:
    """The names an error may cite: every key and section given, dotted, and the overrides' keys."""
    names = []
    for section, values in data.items():
        names.append(str(section))
        if isinstance(values, dict):
            names += [f"{section}.{key}" for key in values]
            names += [
                f"{section}.{key}.{sub}" for key, v in values.items() if isinstance(v, dict) for sub in v
            ]
    names += [text.split("=", 1)[0].strip() for text in given]
    return [n for n in names if n]


def check_one(tmp_path, data: dict, given: list[str]) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        recipe = load_recipe(path, given)
    except GraftError as e:
        message = str(e)
        assert "\n" not in message and message.strip() == message, message
        assert len(message) < 600, message
        names = named_keys(data, given)
        assert any(name in message for name in names), (message, names)
        return
    # A valid recipe: every number finite, and it loads again from what the run folder would hold.
    for value in yaml.safe_load(dump_recipe(recipe)).values():
        for x in value.values():
            assert not (isinstance(x, float) and not math.isfinite(x))
    path.write_text(dump_recipe(recipe), encoding="utf-8")
    assert load_recipe(path) == recipe


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@fuzz(300)
@given(data=recipes(), given_overrides=overrides())
def test_a_random_recipe_loads_or_fails_on_one_line_naming_the_key(tmp_path, data, given_overrides):
    check_one(tmp_path, data, given_overrides)


@pytest.mark.slow
@fuzz(1500)
@given(data=recipes(), given_overrides=overrides())
def test_a_random_recipe_loads_or_fails_on_one_line_naming_the_key_longer(tmp_path, data, given_overrides):
    check_one(tmp_path, data, given_overrides)
