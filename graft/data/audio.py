"""Speech data: audio files and what they say (chapter 9), as Hugging Face's audiofolder and most
speech corpora lay them out.

- A CSV, TSV or JSON lines file with a column of audio file paths (``audio``, ``audio_path``,
  ``audio_file``; or ``path``, ``file_name``, ``file`` when its first value names an audio file)
  and the transcript in ``text`` (or ``sentence``, ``transcript``...). Relative paths start from
  the data file's folder, wherever graft runs.
- A folder with a ``metadata.csv`` (or ``metadata.jsonl``, ``metadata.tsv``) in it, read as above.
- A folder of audio files, each with its transcript in a ``.txt`` file of the same name beside it.

A record is ``{"audio": (N,) float32 samples at 16 kHz, "text": transcript, "id": the path as
written}``. WAV, FLAC and OGG are read through soundfile, mixed to mono and resampled
(graft.speech.audio). Scanning reads every clip once, so a missing, unreadable or truncated file
stops the run before training starts, naming the file and the row; a record's samples are read
again whenever it is loaded (a dataset keeps one key per row, not the audio).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from graft.data.readers import CsvSource, JsonlSource, Source, TsvSource, check_file, missing_path_error
from graft.data.records import DEFAULT_ALIASES, BadRow, LoadStats, ReadOptions, Record, quoted
from graft.errors import GraftError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
METADATA = ("metadata.csv", "metadata.jsonl", "metadata.tsv")
AUDIO_COLUMNS = DEFAULT_ALIASES["audio"]  # audio whatever the values look like
PATH_COLUMNS = ("path", "file_name", "file")  # audio when the first value names an audio file
TABLES: dict[str, type[Source]] = {".csv": CsvSource, ".tsv": TsvSource, ".tab": TsvSource,
                                   ".jsonl": JsonlSource, ".ndjson": JsonlSource, ".json": JsonlSource}  # fmt: skip


def first_row(path: Path) -> dict[str, Any]:
    """The first row of a CSV/TSV/JSON lines file as {column: value} ({} when it cannot be read):
    enough to tell whether it lists audio files."""
    table = TABLES.get(path.suffix.lower())
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if table is JsonlSource:
                line = next((line for line in f if line.strip()), "")
                row = json.loads(line)
                return row if isinstance(row, dict) else {}
            delimiter = "\t" if table is TsvSource else ","
            reader = csv.reader(f, delimiter=delimiter)
            header = [name.strip() for name in next(reader, [])]
            return dict(zip(header, next(reader, [""] * len(header)), strict=False))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return {}


def audio_column(row: dict[str, Any]) -> str | None:
    """The column of ``row`` that holds audio file paths, or None."""
    found = next((name for name in AUDIO_COLUMNS if name in row), None)
    if found is not None:
        return found
    return next(
        (
            name
            for name in PATH_COLUMNS
            if isinstance(row.get(name), str) and row[name].strip().lower().endswith(AUDIO_SUFFIXES)
        ),
        None,
    )


def metadata_file(folder: Path) -> Path | None:
    return next((folder / name for name in METADATA if (folder / name).is_file()), None)


def is_audio_data(path: Path) -> bool:
    """Whether ``path`` is speech data: a table with an audio column, a folder with such a
    metadata file, or a folder with audio files at its top."""
    if path.is_dir():
        meta = metadata_file(path)
        if meta is not None:
            return audio_column(first_row(meta)) is not None
        return any(p.suffix.lower() in AUDIO_SUFFIXES for p in path.iterdir() if p.is_file())
    return path.suffix.lower() in TABLES and audio_column(first_row(path)) is not None


class AudioSource(Source):
    """Audio files and their transcripts; the key is the table's (a byte offset) or the file's
    number in a folder without metadata."""

    format = "audio"

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        super().__init__(path, options)
        self.table: Source | None = None  # the metadata's reader (None: a folder of audio + .txt files)
        self.root = Path(path)  # where relative audio paths start
        self.files: list[Path] = []  # a folder without metadata: its audio files, sorted
        self.where: dict[int, str] = {}  # key -> "file, line N", for errors when a record is loaded

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        path = Path(self.path)
        if not path.exists():
            raise missing_path_error(path)
        meta = metadata_file(path) if path.is_dir() else path
        if meta is None:
            yield from self._scan_folder(path, stats)
            return
        check_file(str(meta))
        if meta.suffix.lower() not in TABLES:
            raise GraftError(
                f"{meta}: speech data is a CSV, TSV or JSON lines file of audio paths and transcripts, "
                f"or a folder of audio files (with a {' or '.join(METADATA)})"
            )
        self.root, self.table = meta.parent, TABLES[meta.suffix.lower()](meta, self._options(meta))
        for key, where, record in self.table.scan(stats):
            try:
                record = self._with_audio(record, where)
            except BadRow as error:
                stats.bad(error)
                continue
            self.where[key] = where
            yield key, where, record

    def load(self, key: int) -> Record:
        if self.table is None:
            return self._file_record(key)
        return self._with_audio(self.table.load(key), self.where.get(key, f"{self.table.path}, key {key}"))

    def _options(self, meta: Path) -> ReadOptions:
        """The user's options, with the audio column named (when they did not map one) and required."""
        columns = dict(self.options.columns)
        if "audio" not in columns.values():
            found = audio_column(first_row(meta))
            if found is None:
                row = first_row(meta)
                raise GraftError(
                    f"{meta}, line 1, column 'audio': no column of audio file paths (looked for "
                    f"{quoted(AUDIO_COLUMNS + PATH_COLUMNS)}; available: {quoted(row)}); name it with "
                    "--column COL=audio (data.columns: {COL: audio} in a recipe)"
                )
            columns[found] = "audio"
        required = tuple(dict.fromkeys((*self.options.required, "audio")))
        return dataclasses.replace(self.options, columns=columns, required=required)

    def _with_audio(self, record: Record, where: str) -> Record:
        """The record with its audio file read: 16 kHz samples in 'audio', the path as written in 'id'."""
        column = self.table.column("audio")
        written = record.get("audio")
        at = f"{where}, column {quoted([column])}"
        if not isinstance(written, str) or not written.strip():
            raise BadRow("bad audio path", f"{at}: expected the path of an audio file, got {written!r}")
        record = {**record, "audio": read_clip(self.root / written.strip(), at)}
        record.setdefault("id", written.strip())
        return record

    def _scan_folder(self, folder: Path, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        self.root = folder
        self.files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
        )
        if not self.files:
            raise GraftError(
                f"{folder}: holds no audio files ({', '.join(AUDIO_SUFFIXES)}) and no {' or '.join(METADATA)}"
            )
        for key in range(len(self.files)):
            try:
                record = self._file_record(key)
            except BadRow as error:
                stats.bad(error)
                continue
            yield key, f"{self.files[key]}, row {key}", record

    def _file_record(self, key: int) -> Record:
        audio = self.files[key]
        transcript = audio.with_suffix(".txt")
        record: Record = {"id": audio.relative_to(self.root).as_posix()}
        if "text" not in self.options.ignore:
            if not transcript.is_file():
                raise BadRow(
                    "no transcript",
                    f"{audio}, row {key}, column 'text': no transcript {transcript.name} beside it "
                    f"(or give the folder a {METADATA[0]} of file_name,text)",
                )
            raw = transcript.read_bytes()
            text, bad = self.decode(raw)
            if bad is not None:
                line = raw.count(b"\n", 0, bad) + 1
                raise self.bad_text(f"{transcript}, line {line}", "text", raw[bad], bad)
            record["text"] = text.removeprefix("\ufeff").strip()
        record["audio"] = read_clip(audio, f"{audio}, row {key}, column 'audio'")
        return record


def read_clip(file: Path, where: str) -> np.ndarray:
    """A file's 16 kHz samples, or a BadRow that names ``where`` (the data file, row and column)."""
    from graft.speech.audio import read_audio  # soundfile, imported when audio is first read

    if not file.is_file():
        raise BadRow("missing audio", f"{where}: audio file {file} does not exist")
    try:
        return read_audio(file)
    except GraftError as error:
        raise BadRow("unreadable audio", f"{where}: {error}") from None
