"""Loading data for training: a streaming record reader, a map-style dataset that keeps only row
keys, seeded stratified splits, and the label map taken from the training data."""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft.data.formats import open_source
from graft.data.labels import LabelMap
from graft.data.readers import Source
from graft.data.records import BadRow, LoadStats, ReadOptions, Record, check_encoding, did_you_mean, quoted
from graft.errors import GraftError


@dataclass
class DataSpec:
    """Where the data is and how to read it.

    Give ``train`` alone to split validation (and test) off it by the fractions, stratified by
    label and seeded; or give ``validation`` / ``test`` files. A path is a file, a folder with
    one sub-folder per class, or 'hf:NAME[:SPLIT]' for the datasets library.
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: str | None = None  # csv, tsv, jsonl, parquet, textfolder, imagefolder, idx, conll, squad, hf...
    columns: dict[str, str] = field(default_factory=dict)  # your column name -> record key
    required: list[str] = field(default_factory=list)  # record keys that must be present
    label_kind: str = "class"  # class | multi | float
    label_delimiter: str = ","
    val_fraction: float = 0.1  # used when no validation file is given
    test_fraction: float = 0.0  # used when no test file is given
    seed: int = 0
    stratify: bool = True  # keep class proportions in each split (single-label data only)
    skip_bad_rows: bool = False
    replace_bad_utf8: bool = False
    # 'auto': UTF-8, except that a text file in a class folder that is not UTF-8 is read as cp1252
    # (with a note naming the first); or a codec for every file: utf-8, cp1252, latin-1...
    encoding: str = "auto"

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise GraftError(f"data.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise GraftError("data: val_fraction + test_fraction must leave rows for training")
        if self.encoding != "auto":
            check_encoding(self.encoding, "data.encoding")
        self.read_options()  # checks the column mapping and the label kind now, not at first read

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            dict(self.columns),
            tuple(self.required),
            self.label_kind,
            self.label_delimiter,
            self.replace_bad_utf8,
            self.encoding,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise GraftError(f"data: unknown key '{key}'{did_you_mean(key, names)}")
        return cls(**data)


class RecordStream:
    """The records of one file, read lazily; ``stats`` counts skipped rows once iteration ends."""

    def __init__(self, source: Source, skip_bad_rows: bool = False) -> None:
        self.source = source
        self.stats = LoadStats(source.path, skip_bad_rows)

    def __iter__(self) -> Iterator[Record]:
        self.stats = LoadStats(self.source.path, self.stats.skip_bad_rows)
        for _, _, record in self.source.scan(self.stats):
            self.stats.rows += 1
            yield record
        self.stats.log()


def load_records(
    path: str | Path,
    format: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    *,
    required: tuple[str, ...] = (),
    label_kind: str = "class",
    label_delimiter: str = ",",
    replace_bad_utf8: bool = False,
    encoding: str = "auto",
    ignore: tuple[str, ...] = (),
    labels: list[str] | None = None,
) -> RecordStream:
    """Stream the records of a file, folder or 'hf:' data set; nothing is held in memory.

    ``ignore`` names record keys not to read (predict ignores labels); ``labels`` are the only
    class names a row may have (eval checks them against the model's, naming file and line).
    """
    options = ReadOptions(
        dict(columns or {}),
        tuple(required),
        label_kind,
        label_delimiter,
        replace_bad_utf8,
        encoding,
        tuple(ignore),
        None if labels is None else tuple(labels),
    )
    return RecordStream(open_source(path, format, options), skip_bad_rows)


class RecordDataset:
    """A map-style dataset (usable with torch's DataLoader) over one source.

    It holds only one int64 key per row (a byte offset for CSV, TSV, JSON lines and CoNLL; a
    row or file number otherwise) and reads a record from the file on each ``__getitem__``.
    """

    def __init__(self, source: Source, keys: np.ndarray, stats: LoadStats, label_map: LabelMap | None = None):
        self.source = source
        self.keys = keys
        self.stats = stats
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Record:
        return self.source.load(int(self.keys[index]))

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"RecordDataset({self.source.path!r}, {len(self)} rows, format={self.source.format!r})"


def class_labels(record: Record, label_kind: str) -> list[str] | None:
    """The class names a record carries: its label(s), or its tags (token classification)."""
    if "label" in record:
        if label_kind == "float":
            return None
        label = record["label"]
        return label if isinstance(label, list) else [label]
    return record.get("tags")


@dataclass
class _Index:
    keys: np.ndarray  # int64, one per good row
    codes: np.ndarray  # int32 class code per row, for stratifying (empty unless single-label)
    labels: list[str]  # every class seen, in order of first appearance


def index_source(source: Source, stats: LoadStats, label_kind: str, known: LabelMap | None = None) -> _Index:
    """One pass over a source: keep the key of each good row; check labels against ``known``."""
    keys, codes = array("q"), array("i")
    seen: dict[str, int] = {}
    single = True
    for key, where, record in source.scan(stats):
        labels = class_labels(record, label_kind)
        if known is not None and labels is not None:
            column = source.column("label" if "label" in record else "tags")
            try:
                known.encode(labels, f"{where}, column {quoted([column])}")
            except BadRow as error:
                stats.bad(error)
                continue
        keys.append(key)
        if labels is not None:
            for label in labels:
                seen.setdefault(label, len(seen))
            single = single and isinstance(record.get("label"), str)
            if single:
                codes.append(seen[labels[0]])
    stats.rows = len(keys)
    stats.log()
    if not keys:
        raise GraftError(
            f"{source.path}: no usable rows ({stats.n_skipped} bad rows skipped: {dict(stats.skipped)})"
        )
    return _Index(
        np.frombuffer(keys, np.int64), np.frombuffer(codes, np.int32) if single else np.empty(0), list(seen)
    )


def split_indices(
    n: int, fractions: dict[str, float], seed: int = 0, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Split ``range(n)`` into 'train' and the named fractions, seeded.

    With ``labels``, each class is split on its own, so every split keeps the class proportions
    to within one example per class.
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in fractions}}
    for group in groups:
        group = rng.permutation(group)
        start = 0
        for name, fraction in fractions.items():
            count = round(fraction * len(group))
            parts[name].append(group[start : start + count])
            start += count
        parts["train"].append(group[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_splits(spec: DataSpec) -> dict[str, RecordDataset]:
    """Index the data files of ``spec`` into 'train' and, when there are any, 'validation' and 'test'.

    The label map comes from the training file (all of it, when splits are cut from it); a label
    in a validation or test file that training never saw is an error (or a skipped row).
    """
    if spec.train is None:
        raise GraftError("data.train: no training data given")
    options = spec.read_options()
    source = open_source(spec.train, spec.format, options)
    stats = LoadStats(source.path, spec.skip_bad_rows)
    index = index_source(source, stats, spec.label_kind)
    label_map = LabelMap(index.labels, multi_label=spec.label_kind == "multi") if index.labels else None

    fractions = {
        name: fraction
        for name, fraction in (("validation", spec.val_fraction), ("test", spec.test_fraction))
        if fraction > 0 and getattr(spec, name) is None
    }
    stratify = spec.stratify and len(index.codes) == len(index.keys)
    parts = split_indices(len(index.keys), fractions, spec.seed, index.codes if stratify else None)
    splits = {}
    for name, rows in parts.items():
        if len(rows) == 0:
            raise GraftError(
                f"{spec.train}: the {name} split is empty ({len(index.keys)} rows, fractions {fractions}); "
                f"use a larger fraction or give a {name} file"
            )
        splits[name] = RecordDataset(source, index.keys[rows], stats, label_map)

    for name in ("validation", "test"):
        path = getattr(spec, name)
        if path is not None:
            other = open_source(path, spec.format, options)
            other_stats = LoadStats(other.path, spec.skip_bad_rows)
            other_index = index_source(other, other_stats, spec.label_kind, known=label_map)
            splits[name] = RecordDataset(other, other_index.keys, other_stats, label_map)
    return splits
