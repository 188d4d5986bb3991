"""The record format every reader yields, the column mapping, and bad-row bookkeeping.

A record is a plain dict with canonical keys (any subset):

    text, text_pair, question, context, id   str
    label        str (one class), list[str] (multi-label) or float (regression)
    tokens, tags list[str] of equal length (token classification)
    answers      {"text": [str, ...], "answer_start": [int, ...]} as in SQuAD; empty lists when
                 the question has no answer (SQuAD v2 ``is_impossible``)
    image        numpy uint8 array, (H, W) for grayscale or (H, W, C) for colour

Class labels are always strings (a CSV gives "3", a JSON line 3: both become "3"), so a label
map is the same whichever file format the labels came from.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from graft.errors import GraftError, did_you_mean

logger = logging.getLogger("graft.data")

Record = dict[str, Any]

CANONICAL_KEYS = (
    "text",
    "text_pair",
    "label",
    "tokens",
    "tags",
    "question",
    "context",
    "answers",
    "id",
    "image",
)

# The user's column names that map to each canonical key when no explicit mapping says otherwise,
# most specific first: a file with both 'text' and 'sentence' columns uses 'text'.
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "content", "document", "review", "sentence1", "question1", "premise"),
    "text_pair": ("text_pair", "sentence2", "question2", "hypothesis"),
    "label": ("label", "labels", "category", "class", "target"),
    "tokens": ("tokens", "words"),
    "tags": ("tags", "ner_tags", "ner", "pos_tags"),
    "question": ("question",),
    "context": ("context", "passage"),
    "answers": ("answers", "answer"),
    "id": ("id", "idx", "guid"),
    "image": ("image", "img"),
}

# A record needs at least one of these to be an input to a model.
INPUT_KEYS = ("text", "tokens", "question", "image")
TEXT_KEYS = ("text", "text_pair", "question", "context", "id")
LABEL_KINDS = ("class", "multi", "float")

_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by 'surrogateescape'


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def has_bad_utf8(value: Any) -> bool:
    """True when text decoded with 'surrogateescape' held bytes that are not UTF-8."""
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(has_bad_utf8(item) for item in value)
    if isinstance(value, dict):
        return any(has_bad_utf8(item) for item in value.values())
    return False


class BadRow(GraftError):
    """One row that cannot be used. Fatal by default; counted and skipped with skip_bad_rows."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short and stable: the key under which skipped rows are counted


@dataclass
class LoadStats:
    """What reading one file gave: rows kept, and rows skipped per reason (with the first message)."""

    source: str
    skip_bad_rows: bool = False
    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)

    def bad(self, error: BadRow) -> None:
        """Raise ``error``, or count it when the user asked to skip bad rows."""
        if not self.skip_bad_rows:
            raise error
        self.skipped[error.reason] += 1
        self.first_error.setdefault(error.reason, str(error))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        first = next(iter(self.first_error.values()), "")
        return f"{self.source}: kept {self.rows} rows, skipped {self.n_skipped} bad rows ({reasons}); first: {first}"

    def log(self) -> None:
        if self.skipped:
            logger.warning(self.summary())


@dataclass
class ReadOptions:
    """How to turn the rows of a file into records."""

    columns: dict[str, str] = field(default_factory=dict)  # user's column name -> canonical key
    required: tuple[str, ...] = ()  # canonical keys that must be present, e.g. ("text", "label")
    label_kind: str = "class"  # class | multi | float
    label_delimiter: str = ","  # splits a multi-label string: "sport,politics"
    replace_bad_utf8: bool = False  # decode bytes that are not UTF-8 as U+FFFD instead of failing

    def __post_init__(self) -> None:
        for source, key in self.columns.items():
            if key not in CANONICAL_KEYS:
                raise GraftError(
                    f"columns: '{source}' maps to '{key}', which is not a record key "
                    f"(one of {quoted(CANONICAL_KEYS)}){did_you_mean(key, CANONICAL_KEYS)}"
                )
        for key in self.required:
            if key not in CANONICAL_KEYS:
                raise GraftError(f"required: '{key}' is not a record key{did_you_mean(key, CANONICAL_KEYS)}")
        if self.label_kind not in LABEL_KINDS:
            raise GraftError(
                f"label_kind: '{self.label_kind}' is not one of {quoted(LABEL_KINDS)}"
                f"{did_you_mean(self.label_kind, LABEL_KINDS)}"
            )

    def resolve(self, available: Iterable[str], where: str) -> RowBuilder:
        """Map the columns a file has to canonical keys; ``where`` names the header, e.g. 'a.csv, line 1'."""
        available = list(available)
        mapping: dict[str, str] = {}
        for source, key in self.columns.items():
            if source not in available:
                raise GraftError(
                    f"{where}, column '{source}': no such column (available: {quoted(available)})"
                    f"{did_you_mean(source, available)}"
                )
            mapping[source] = key
        for key, aliases in DEFAULT_ALIASES.items():
            if key in mapping.values():
                continue
            found = next((name for name in aliases if name in available and name not in mapping), None)
            if found is not None:
                mapping[found] = key
        keys = set(mapping.values())
        for key in self.required:
            if key not in keys:
                # Suggest an unmapped column close to the key or to one of its usual names.
                unused = [name for name in available if name not in mapping]
                hint = next(filter(None, (did_you_mean(n, unused) for n in (key, *DEFAULT_ALIASES[key]))), "")
                raise GraftError(
                    f"{where}, column '{key}': no such column (available: {quoted(available)}){hint}; "
                    f"name it with columns={{'<your column>': '{key}'}}"
                )
        if not keys & set(INPUT_KEYS) and "context" not in keys:
            names = [alias for key in INPUT_KEYS for alias in DEFAULT_ALIASES[key]]
            raise GraftError(
                f"{where}, column 'text': no input column (looked for {quoted(names)}; available: "
                f"{quoted(available)}); name one with columns={{'<your column>': 'text'}}"
            )
        return RowBuilder(mapping, self.label_kind, self.label_delimiter)


@dataclass
class RowBuilder:
    """Turns one raw row (a dict keyed by the file's column names) into a checked record."""

    mapping: dict[str, str]  # file column -> canonical key
    label_kind: str = "class"
    label_delimiter: str = ","

    def column(self, key: str) -> str:
        """The file's name for canonical ``key``, for error messages."""
        return next((source for source, canonical in self.mapping.items() if canonical == key), key)

    def build(self, row: Mapping[str, Any], where: str) -> Record:
        record: Record = {}
        for source, key in self.mapping.items():
            if source not in row:
                raise BadRow(
                    "missing column",
                    f"{where}, column '{source}': missing from this row (it has {quoted(row)})",
                )
            record[key] = self._value(key, row[source], f"{where}, column '{source}'")
        if "tokens" in record and "tags" in record and len(record["tokens"]) != len(record["tags"]):
            raise BadRow(
                "tags/tokens mismatch",
                f"{where}, column '{self.column('tags')}': {len(record['tags'])} tags for "
                f"{len(record['tokens'])} tokens (column '{self.column('tokens')}')",
            )
        if "answers" in record and "context" in record:
            _check_answers(
                record["answers"], record["context"], f"{where}, column '{self.column('answers')}'"
            )
        return record

    def _value(self, key: str, value: Any, where: str) -> Any:
        if key in TEXT_KEYS:
            if value is None:
                raise BadRow("missing value", f"{where}: no value (null)")
            if isinstance(value, list | dict):
                raise BadRow("bad value", f"{where}: expected text, got a {type(value).__name__}")
            return value if isinstance(value, str) else str(value)
        if key == "label":
            return self._label(value, where)
        if key in ("tokens", "tags"):
            if isinstance(value, str):
                return value.split()
            if not isinstance(value, list | tuple):
                raise BadRow(
                    "bad value", f"{where}: expected a list or a space-separated string, got {value!r}"
                )
            return [str(item) for item in value]
        if key == "answers":
            return _answers(value, where)
        return value

    def _label(self, value: Any, where: str) -> str | list[str] | float:
        if self.label_kind == "float":
            try:
                number = float(value) if not isinstance(value, bool | list | dict) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise BadRow("bad label", f"{where}: label {value!r} is not a finite number")
            return number
        if self.label_kind == "multi":
            if isinstance(value, str):
                return [part.strip() for part in value.split(self.label_delimiter) if part.strip()]
            if isinstance(value, list | tuple):
                return [_class_name(item) for item in value]
            if value is None:
                return []
            return [_class_name(value)]
        if isinstance(value, list | tuple | dict):
            raise BadRow("bad label", f"{where}: expected one label, got {value!r}; use label_kind='multi'")
        if value is None or value == "":
            raise BadRow("missing label", f"{where}: empty label")
        return _class_name(value)


def _class_name(value: Any) -> str:
    """3, 3.0 and "3" are the same class."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _answers(value: Any, where: str) -> dict[str, list]:
    """SQuAD's list of {'text', 'answer_start'} dicts, or the datasets-style dict of lists."""
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        value = {
            "text": [item.get("text") for item in value],
            "answer_start": [item.get("answer_start") for item in value],
        }
    if not isinstance(value, dict) or not isinstance(value.get("text"), list) or "answer_start" not in value:
        raise BadRow(
            "bad value", f"{where}: expected {{'text': [...], 'answer_start': [...]}}, got {value!r}"
        )
    texts, starts = value["text"], list(value["answer_start"])
    if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts):
        raise BadRow("bad value", f"{where}: {len(texts)} answer texts for {len(starts)} answer_start values")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
        raise BadRow("bad value", f"{where}: answer_start must be whole numbers, got {starts!r}")
    return {"text": list(texts), "answer_start": starts}


def _check_answers(answers: dict[str, list], context: str, where: str) -> None:
    for text, start in zip(answers["text"], answers["answer_start"], strict=True):
        if context[start : start + len(text)] != text:
            raise BadRow(
                "answer not in context",
                f"{where}: answer {text!r} is not at answer_start {start} of the context "
                f"(found {context[start : start + len(text)]!r})",
            )
