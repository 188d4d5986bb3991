"""What a user can get wrong at graft's boundaries: one error type, the did-you-mean hint, and
reading a value the user wrote (YAML or command-line text) as the type a field declares.

The CLI prints ``str(error)`` on one line and exits non-zero; library users catch
``GraftError``. Messages name the file, line, key or field at fault.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


class GraftError(Exception):
    """A user-facing error: bad file, bad config, bad data, bad flag."""


def did_you_mean(name: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """ "; did you mean 'x'?" when a choice is close to ``name``, else "".

    ``aliases`` are other spellings and what they stand for: ``{"learning_rate": "optim.lr"}``
    suggests 'optim.lr' for 'learning_rate' (or 'learningrate').
    """
    close = closest(name, choices, aliases)
    return f"; did you mean '{close}'?" if close else ""


def closest(name: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The choice most like ``name`` (difflib's ratio at least 0.6), or what its closest alias stands for."""
    table = {**{c: c for c in choices}, **(aliases or {})}
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
    return table[close[0]] if close else None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint``, or a GraftError "``where``: expected int, got 'many'".

    Text is read as the type asks (a command line gives only text, YAML reads 3e-5 as text):
    "4" is an int, "true" a bool, "a+b" a list, "none" or "" is None where None is allowed.
    Floats must be finite. Dataclasses and bounds are the caller's business.
    """
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint) and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
        ):
            return None
        errors = []
        for option in options:
            try:
                return coerce(value, option, where)
            except GraftError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        items = value.split("+") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise GraftError(f"{where}: expected a list ([a, b] or a+b), got {shown(value)}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise GraftError(f"{where}: expected a mapping, got {shown(value)}")
        key_type, item = typing.get_args(hint) or (Any, Any)
        return {coerce(k, key_type, where): coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        number = _number(value)
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None:
            try:
                number = float(number)
            except OverflowError:  # an int beyond float's range
                number = math.inf
            if not math.isfinite(number):
                raise GraftError(f"{where}: expected a finite number, got {shown(value)}")
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(hint, "__name__", str(hint))
    raise GraftError(f"{where}: expected {name}, got {shown(value)}")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages (it is always one line)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        text = "a number too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> int | float | None:
    """An int or float from a number or its text; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return None
