"""The record format every reader yields, the column mapping, and bad-row bookkeeping.

A record is a plain dict with canonical keys (any subset):

    text, text_pair, question, context, id   str
    group        str: the group a row belongs to (``graft eval --groups COLUMN``)
    label        str (one class), list[str] (multi-label) or float (regression)
    tokens, tags list[str] of equal length (token classification)
    answers      {"text": [str, ...], "answer_start": [int, ...]} as in SQuAD; empty lists when
                 the question has no answer (SQuAD v2 ``is_impossible``)
    image        numpy uint8 array, (H, W) for grayscale or (H, W, C) for colour
    audio        numpy float32 array, (N,) samples at 16 kHz (graft.data.audio reads the files)

Class labels are always strings (a CSV gives "3", a JSON line 3: both become "3"), so a label
map is the same whichever file format the labels came from.
"""

from __future__ import annotations

import codecs
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    "group",
    "audio",
)

# The user's column names that map to each canonical key when no explicit mapping says otherwise,
# most specific first: a file with both 'text' and 'sentence' columns uses 'text'.
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "text": (
        "text",
        "sentence",
        "content",
        "document",
        "review",
        "sentence1",
        "question1",
        "premise",
        "transcript",
        "transcription",
    ),
    "text_pair": ("text_pair", "sentence2", "question2", "hypothesis"),
    "label": ("label", "labels", "category", "class", "target"),
    "tokens": ("tokens", "words"),
    "tags": ("tags", "ner_tags", "ner", "pos_tags"),
    "question": ("question",),
    "context": ("context", "passage"),
    "answers": ("answers", "answer"),
    "id": ("id", "idx", "guid"),
    "image": ("image", "img", "image_path", "file_name"),
    "audio": ("audio", "audio_path", "audio_file"),  # paths, read by graft.data.audio
}

# A record needs at least one of these to be an input to a model.
INPUT_KEYS = ("text", "tokens", "question", "image", "audio")
TEXT_KEYS = ("text", "text_pair", "question", "context", "id", "group")
LABEL_KINDS = ("class", "multi", "float")

_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by 'surrogateescape'


SHOWN = 60  # characters of a user's value an error message shows: a 16 MB field is not a message


def quoted(names: Iterable[str]) -> str:
    """'a', 'b': names as an error message shows them, on one line, long ones cut."""
    return ", ".join(_quote(str(name)) for name in names)


def _quote(name: str) -> str:
    short = name if len(name) <= SHOWN else f"{name[:SHOWN]}..."
    return f"'{short}'" if short.isprintable() else repr(short)


def shown(value: Any) -> str:
    """repr(value) cut to a readable length, with the full length said when cut."""
    text = repr(value)
    return text if len(text) <= 2 * SHOWN else f"{text[: 2 * SHOWN]}... ({len(text)} characters)"


def known_labels(labels: list[str]) -> str:
    """The first labels of a long list, for an error message."""
    return ", ".join(label[:SHOWN] for label in labels[:20]) + (
        f", ... ({len(labels)} in all)" if len(labels) > 20 else ""
    )


def label_error(reason: str, where: str, label: str, labels: list[str], fault: str) -> BadRow:
    """A row whose label is not one of ``labels``: names the label, lists the known ones, suggests one."""
    return BadRow(
        reason,
        f"{where}: label {quoted([label])} {fault} (known: {known_labels(labels)})"
        f"{did_you_mean(label, labels)}",
    )


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
        """'skipped 2 bad rows of a.csv (first: line 3: ...); 1 not UTF-8, 1 missing label; kept 40 rows'"""
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        first = next(iter(self.first_error.values()), "")
        first = first.removeprefix(f"{self.source}, ").removeprefix(f"{self.source.rstrip('/')}/")
        return (
            f"skipped {self.n_skipped} bad rows of {self.source} (first: {first}); {reasons}; "
            f"kept {self.rows} rows"
        )

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
    # How bytes become text: 'auto' is UTF-8, except that a text file in a class folder that is not
    # UTF-8 is read as cp1252 (with a note); any other name is a codec used for every file.
    encoding: str = "auto"
    ignore: tuple[str, ...] = ()  # record keys not to read at all (predict reads no labels)
    labels: tuple[str, ...] | None = None  # the only class names a row may have (a model's labels)

    def __post_init__(self) -> None:
        if self.encoding != "auto":
            check_encoding(self.encoding)
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

    def resolve(self, available: Iterable[str], where: str, folder: str | None = None) -> RowBuilder:
        """Map the columns a file has to canonical keys; ``where`` names the header, e.g. 'a.csv, line 1';
        ``folder`` (the data file's) is where relative image paths start.

        A column named twice is an error when it is read (which one holds the data?), and harmless
        when it is not (spreadsheets export empty trailing header cells).
        """
        names = list(available)
        available = list(dict.fromkeys(names))
        mapping: dict[str, str] = {}
        for source, key in self.columns.items():
            if source not in available:
                raise GraftError(
                    f"{where}, column {quoted([source])}: no such column (available: {quoted(available)})"
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
                    f"{name_it(key)}"
                )
        if not keys & set(INPUT_KEYS) and "context" not in keys:
            aliases = [alias for key in INPUT_KEYS for alias in DEFAULT_ALIASES[key]]
            raise GraftError(
                f"{where}, column 'text': no input column (looked for {quoted(aliases)}; available: "
                f"{quoted(available)}); {name_it('text')}"
            )
        mapping = {source: key for source, key in mapping.items() if key not in self.ignore}
        for source in mapping:
            positions = [i + 1 for i, name in enumerate(names) if name == source]
            if len(positions) > 1:
                raise GraftError(
                    f"{where}, column {quoted([source])}: the header names it twice (columns "
                    f"{' and '.join(map(str, positions))}), so which one holds the data is ambiguous; "
                    "rename one in the header"
                )
        return self.builder(mapping, folder)

    def builder(self, mapping: dict[str, str], folder: str | None = None) -> RowBuilder:
        """The RowBuilder for ``mapping`` (file column -> record key) under these options."""
        labels = None if self.labels is None or self.label_kind == "float" else list(self.labels)
        return RowBuilder(mapping, self.label_kind, self.label_delimiter, labels, folder)


def name_it(key: str) -> str:
    """The hint that maps a column to ``key``, in the CLI's words and a recipe's."""
    return f"name it with --column COL={key} (data.columns: {{COL: {key}}} in a recipe)"


def check_encoding(name: str, key: str = "encoding") -> None:
    """Fail unless ``name`` is a codec that keeps ASCII as it is (files are split into lines as bytes)."""
    try:
        codecs.lookup(name)
        ascii_safe = "a,\t\n".encode(name) == b"a,\t\n"
    except (LookupError, UnicodeError, ValueError):
        ascii_safe = None
    if not ascii_safe:
        fault = "is not a text encoding" if ascii_safe is None else "does not keep ASCII as it is"
        raise GraftError(
            f"{key}: '{name}' {fault}; use 'auto', 'utf-8', 'cp1252', 'latin-1' or another "
            "ASCII-compatible codec (--encoding, data.encoding in a recipe)"
        )


@dataclass
class RowBuilder:
    """Turns one raw row (a dict keyed by the file's column names) into a checked record."""

    mapping: dict[str, str]  # file column -> canonical key
    label_kind: str = "class"
    label_delimiter: str = ","
    labels: list[str] | None = None  # the only class names allowed (label or tags); None allows any
    folder: str | None = None  # where relative image paths start (the data file's folder); None: here

    def __post_init__(self) -> None:
        self._allowed = None if self.labels is None else set(self.labels)

    def column(self, key: str) -> str:
        """The file's name for canonical ``key``, for error messages."""
        return next((source for source, canonical in self.mapping.items() if canonical == key), key)

    def build(self, row: Mapping[str, Any], where: str) -> Record:
        record: Record = {}
        for source, key in self.mapping.items():
            if source not in row:
                raise BadRow(
                    "missing column",
                    f"{where}, column {quoted([source])}: missing from this row (it has {quoted(row)})",
                )
            record[key] = self._value(key, row[source], f"{where}, column {quoted([source])}")
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
        if self.labels is not None:
            self._check_labels(record, where)
        return record

    def _check_labels(self, record: Record, where: str) -> None:
        for key in ("label", "tags"):
            values = record.get(key)
            values = values if isinstance(values, list) else [] if values is None else [values]
            for value in values:
                if value not in self._allowed:
                    where = f"{where}, column {quoted([self.column(key)])}"
                    raise label_error(
                        "unknown label", where, value, self.labels, "is not one of the model's labels"
                    )

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
                    "bad value", f"{where}: expected a list or a space-separated string, got {shown(value)}"
                )
            return [str(item) for item in value]
        if key == "answers":
            return _answers(value, where)
        if key == "image" and isinstance(value, str):
            return image_path(value, self.folder, where)
        return value

    def _label(self, value: Any, where: str) -> str | list[str] | float:
        if self.label_kind == "float":
            try:
                number = float(value) if not isinstance(value, bool | list | dict) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise BadRow("bad label", f"{where}: label {shown(value)} is not a finite number")
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
            raise BadRow(
                "bad label",
                f"{where}: expected one label, got {shown(value)}; for several, set data.label_kind: multi",
            )
        if value is None or value == "":
            raise BadRow("missing label", f"{where}: empty label")
        return _class_name(value)


def image_path(written: str, folder: str | None, where: str) -> str:
    """The file an image column names: a relative path starts from the data file's ``folder`` (as
    audio paths do), wherever graft runs; an absolute one is kept. A missing file is a bad row."""
    if not written.strip():
        raise BadRow("missing value", f"{where}: no image path (empty)")
    path = Path(folder or "") / written.strip()
    if not path.is_file():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        raise BadRow(
            "missing image", f"{where}: no such image file {path}{did_you_mean(path.name, siblings)}"
        )
    return str(path)


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
            "bad value", f"{where}: expected {{'text': [...], 'answer_start': [...]}}, got {shown(value)}"
        )
    texts, starts = value["text"], list(value["answer_start"])
    if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts):
        raise BadRow("bad value", f"{where}: {len(texts)} answer texts for {len(starts)} answer_start values")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
        raise BadRow("bad value", f"{where}: answer_start must be whole numbers, got {shown(starts)}")
    return {"text": list(texts), "answer_start": starts}


def _check_answers(answers: dict[str, list], context: str, where: str) -> None:
    for text, start in zip(answers["text"], answers["answer_start"], strict=True):
        if context[start : start + len(text)] != text:
            raise BadRow(
                "answer not in context",
                f"{where}: answer {shown(text)} is not at answer_start {start} of the context "
                f"(found {shown(context[start : start + len(text)])})",
            )
