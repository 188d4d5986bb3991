"""Which reader reads a path: the format registry and auto-detection."""

from __future__ import annotations

import json
import re
from pathlib import Path

from graft.data.audio import AudioSource, is_audio_data
from graft.data.folders import IMAGE_SUFFIXES, IdxSource, ImageFolderSource, TextFolderSource, class_folders
from graft.data.hub import HubSource
from graft.data.readers import (
    ConllSource,
    CsvSource,
    JsonlSource,
    ParquetSource,
    Source,
    SquadSource,
    TsvSource,
    missing_path_error,
)
from graft.data.records import ReadOptions, did_you_mean, quoted
from graft.errors import GraftError

FORMATS: dict[str, type[Source]] = {
    source.format: source
    for source in (
        CsvSource,
        TsvSource,
        JsonlSource,
        ParquetSource,
        TextFolderSource,
        ImageFolderSource,
        IdxSource,
        ConllSource,
        SquadSource,
        HubSource,
        AudioSource,
    )
}

_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
}


def detect_format(path: str | Path) -> str:
    """The format name for ``path``, from its 'hf:' prefix, its suffix or its folder layout."""
    text = str(path)
    if text.startswith("hf:"):
        return "hf"
    path = Path(path)
    if not path.exists():
        raise missing_path_error(path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"  # saved with datasets' save_to_disk
        if is_audio_data(path):  # audio files (and a metadata.csv)
            return "audio"
        for folder in class_folders(path):
            for file in folder.rglob("*"):
                if file.is_file() and not file.name.startswith("."):
                    return "imagefolder" if file.suffix.lower() in IMAGE_SUFFIXES else "textfolder"
        return "textfolder"
    if re.search(r"idx\d", path.name) or path.name.endswith((".ubyte", ".ubyte.gz")):
        return "idx"
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return "audio" if is_audio_data(path) else _SUFFIXES[suffix]
    if suffix == ".json":
        kind = _json_kind(path)
        return "audio" if kind == "jsonl" and is_audio_data(path) else kind
    raise GraftError(
        f"{path}: cannot tell the format from the name; pass --format (data.format in a recipe), "
        f"one of {quoted(FORMATS)} (or prefix a datasets name with 'hf:')"
    )


def _json_kind(path: Path) -> str:
    """A .json file is JSON lines when its first line is a whole object, else one SQuAD-style document."""
    with open(path, "rb") as f:
        first = f.readline().strip()
    try:
        row = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "squad"
    return "squad" if isinstance(row, dict) and "data" in row else "jsonl"


def open_source(path: str | Path, format: str | None = None, options: ReadOptions | None = None) -> Source:
    """The reader for ``path`` (``format`` detected when None)."""
    format = format or detect_format(path)
    if format not in FORMATS:
        raise GraftError(
            f"format: '{format}' is not one of {quoted(FORMATS)}{did_you_mean(format, FORMATS)} "
            "(--format, data.format in a recipe)"
        )
    return FORMATS[format](path, options)
