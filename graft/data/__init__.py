"""Data: read files into records, index them for training, split them, map their labels.

    from graft.data import DataSpec, load_records, load_splits

    for record in load_records("reviews.csv", columns={"review": "text", "stars": "label"}):
        ...
    splits = load_splits(DataSpec(train="bbc/", val_fraction=0.1, seed=0))
    splits["train"][0]             # {'text': ..., 'label': 'business', 'id': 'business/001.txt'}
    splits["train"].label_map      # LabelMap: save it with the model

The record format is described in ``graft.data.records``.
"""

from graft.data.dataset import (
    DataSpec,
    RecordDataset,
    RecordStream,
    index_source,
    load_records,
    load_splits,
    split_indices,
)
from graft.data.folders import read_idx
from graft.data.formats import FORMATS, detect_format, open_source
from graft.data.labels import LabelMap
from graft.data.readers import Source
from graft.data.records import CANONICAL_KEYS, DEFAULT_ALIASES, BadRow, LoadStats, ReadOptions, Record

__all__ = [
    "CANONICAL_KEYS",
    "DEFAULT_ALIASES",
    "FORMATS",
    "BadRow",
    "DataSpec",
    "LabelMap",
    "LoadStats",
    "ReadOptions",
    "Record",
    "RecordDataset",
    "RecordStream",
    "Source",
    "detect_format",
    "index_source",
    "load_records",
    "load_splits",
    "open_source",
    "read_idx",
    "split_indices",
]
