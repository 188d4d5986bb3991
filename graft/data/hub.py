"""Data sets through the Hugging Face ``datasets`` library: a Hub id (when online), a folder saved
with ``save_to_disk``, a local data set folder, or a local file read by one of its builders.

``datasets`` memory-maps its Arrow files, so the key is simply the row number. It is an optional
dependency, imported only here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from graft.data.readers import Source
from graft.data.records import BadRow, LoadStats, Record, quoted
from graft.errors import GraftError

# The datasets builder for a local file, by suffix.
_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


def parse_hub_path(path: str) -> tuple[str, str]:
    """'hf:NAME' or 'hf:NAME:SPLIT' -> (NAME, SPLIT); the split defaults to 'train'."""
    name = path.removeprefix("hf:")
    head, _, tail = name.rpartition(":")
    if head and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return name, "train"


class HubSource(Source):
    format = "hf"

    def __init__(self, path: str | Path, options: Any = None) -> None:
        super().__init__(path, options)
        self.name, self.split = parse_hub_path(str(path))
        self._names: dict[str, list[str]] = {}  # column -> class names, for ClassLabel columns

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        data = self._dataset()
        self.rows = self.options.resolve(data.column_names, f"{self.path}, schema")
        if len(data) == 0:
            raise GraftError(f"{self.path}, row 0: empty data set (split '{self.split}' has no rows)")
        self._names = {
            column: names for column in self.rows.mapping if (names := _class_names(data.features[column]))
        }
        for row, values in enumerate(data.select_columns(list(self.rows.mapping))):
            where = f"{self.path}, row {row}"
            try:
                record = self._record(values, where)
            except BadRow as error:
                stats.bad(error)
                continue
            yield row, where, record

    def load(self, key: int) -> Record:
        return self._record(self._dataset()[key], f"{self.path}, row {key}")

    def _record(self, values: dict[str, Any], where: str) -> Record:
        values = {column: values[column] for column in self.rows.mapping if column in values}
        for column, names in self._names.items():  # ClassLabel ids -> class names
            value = values.get(column)
            values[column] = [names[v] for v in value] if isinstance(value, list) else names[value]
        if "image" in self.rows.mapping.values():
            column = self.rows.column("image")
            if hasattr(values.get(column), "mode"):  # a PIL image from datasets' Image feature
                values[column] = np.asarray(values[column], dtype=np.uint8)
        return self.rows.build(values, where)

    def _dataset(self) -> Any:
        if self._handle is None:
            self._handle = load_hub_dataset(self.name, self.split, self.path)
        return self._handle


def load_hub_dataset(name: str, split: str, where: str) -> Any:
    """A ``datasets.Dataset`` for one split."""
    try:
        import datasets
    except ImportError:
        raise GraftError(f"{where}: reading this needs the datasets library: pip install datasets") from None
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise GraftError(f"{where}: no split '{split}' (splits: {quoted(data)})")
                data = data[split]
            return data
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise GraftError(
                    f"{where}: datasets cannot read '{path.suffix}' files (it reads {quoted(_BUILDERS)})"
                )
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
        return datasets.load_dataset(name, split=split)
    except GraftError:
        raise
    except Exception as error:  # datasets raises many types (offline, not found, bad split...): name them all
        raise GraftError(
            f"{where}: datasets could not load split '{split}' ({type(error).__name__}: {error})"
        ) from None


def _class_names(feature: Any) -> list[str] | None:
    """Class names of a ClassLabel column, or of a sequence of ClassLabels (NER tags)."""
    import datasets

    inner = getattr(feature, "feature", None)
    if isinstance(feature, list) and feature:
        inner = feature[0]
    for candidate in (feature, inner):
        if isinstance(candidate, datasets.ClassLabel):
            return list(candidate.names)
    return None
