"""Readers for data files: CSV, TSV, JSON lines, Parquet, CoNLL and SQuAD-style JSON.

Every format is a ``Source``. ``scan()`` streams the file once, checks every row and yields
``(key, where, record)``; ``load(key)`` reads that one record again. A key is small (the byte
offset where a row starts, or a row number), so a dataset over a file larger than memory keeps
only an array of keys and reads each record from a memory map when asked for it.
"""

from __future__ import annotations

import csv
import json
import mmap
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from itertools import accumulate, chain, takewhile
from pathlib import Path
from typing import Any, BinaryIO

from graft.data.records import (
    BadRow,
    LoadStats,
    ReadOptions,
    Record,
    RowBuilder,
    did_you_mean,
    has_bad_utf8,
    quoted,
    shown,
)
from graft.errors import GraftError

BOM = b"\xef\xbb\xbf"


class Source:
    """One data file or folder in one format."""

    format = ""

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        self.path = str(path)
        self.options = options or ReadOptions()
        self.rows: RowBuilder | None = None  # the column mapping, resolved by scan() from the header
        self._handle: Any = None  # memory map, open file or loaded table: opened lazily, per process

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        """Yield ``(key, where, record)`` for every good row; hand bad rows to ``stats.bad``."""
        raise NotImplementedError

    def load(self, key: int) -> Record:
        """The record at ``key``, as scan() yielded it (scan() must have run first)."""
        raise NotImplementedError

    @property
    def folder(self) -> str:
        """The data file's folder, where relative paths in it start."""
        return str(Path(self.path).parent)

    def column(self, key: str) -> str:
        """The file's column name for canonical ``key``, for error messages."""
        return self.rows.column(key) if self.rows else key

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the open handle, and reopen the file themselves.
        return {**self.__dict__, "_handle": None}

    @property
    def codec(self) -> str:
        """The encoding text is decoded with ('auto' reads UTF-8)."""
        return "utf-8" if self.options.encoding == "auto" else self.options.encoding

    def decode(self, raw: bytes) -> tuple[str, int | None]:
        """The text of ``raw`` and the index of its first byte that does not decode (None if all do).

        Bad bytes are kept as surrogates, so that a reader can tell which column holds them.
        """
        try:
            return raw.decode(self.codec), None
        except UnicodeDecodeError as error:
            if self.options.replace_bad_utf8:
                return raw.decode(self.codec, "replace"), None
            return raw.decode(self.codec, "surrogateescape"), error.start

    def bad_text(self, where: str, column: str, byte: int, offset: int) -> BadRow:
        """A row whose text in ``column`` does not decode: byte value ``byte`` at ``offset`` in the file."""
        name = "UTF-8" if self.codec.replace("_", "-").lower() in ("utf-8", "utf8") else self.codec
        return BadRow(
            f"not {name}",
            f"{where}, column {quoted([column])}: text is not {name} (byte 0x{byte:02x} at byte offset "
            f"{offset}); if the file has another encoding, name it with --encoding, e.g. --encoding cp1252 "
            "(data.encoding in a recipe)",
        )

    def _mmap(self) -> mmap.mmap:
        if self._handle is None:
            with open(self.path, "rb") as f:
                self._handle = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._handle

    def _lines_at(self, offset: int) -> Iterator[bytes]:
        memory = self._mmap()
        memory.seek(offset)
        return iter(memory.readline, b"")


def missing_path_error(path: str | Path) -> GraftError:
    path = Path(path)
    siblings = [child.name for child in path.parent.iterdir()] if path.parent.is_dir() else []
    return GraftError(f"{path}: no such file or folder{did_you_mean(path.name, siblings)}")


def check_file(path: str) -> None:
    """Fail clearly on a missing or empty file, before a parser gets confused by it."""
    file = Path(path)
    if not file.exists():
        raise missing_path_error(path)
    if file.is_dir():
        raise GraftError(f"{path}: is a folder; expected a file")
    if file.stat().st_size == 0:
        raise GraftError(f"{path}, line 1: empty file (0 bytes)")


def read_lines(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw bytes)`` for each line of a binary file; skips a UTF-8 BOM."""
    offset = 0
    for number, raw in enumerate(f, 1):
        start, offset = offset, offset + len(raw)
        if start == 0 and raw.startswith(BOM):
            start, raw = len(BOM), raw[len(BOM) :]
        yield number, start, raw


class DuplicateKey(Exception):
    """A JSON object with the same key twice (json keeps the last value silently)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object as a dict, or DuplicateKey naming the repeated key."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return row


class CsvSource(Source):
    """Comma-separated values with a header line. Quoted fields may span lines."""

    format = "csv"
    dialect: dict[str, Any] = {"delimiter": ","}

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        super().__init__(path, options)
        self.header: list[str] = []  # the file's column names, read by scan()

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        check_file(self.path)
        csv.field_size_limit(2**31 - 1)  # whole documents in one field: the default limit is 128 KiB
        self.header, seen = [], 0
        with open(self.path, "rb") as f:
            # The csv reader pulls exactly the lines of one record before yielding it, so the lines
            # collected here since the last record are this record's: the first gives its offset.
            pulled: list[tuple[int, int, bytes, int | None]] = []

            def lines() -> Iterator[str]:
                for number, offset, raw in read_lines(f):
                    text, bad = self.decode(raw)
                    pulled.append((number, offset, raw, bad))
                    yield text

            reader = csv.reader(lines(), **self.dialect)
            try:
                for fields in reader:
                    row_lines = pulled.copy()
                    pulled.clear()
                    number, offset = row_lines[0][:2]
                    if not fields:  # a blank line is no row
                        continue
                    if not self.header:
                        self.header = [name.strip() for name in fields]
                        self.rows = self.options.resolve(
                            self.header, f"{self.path}, line {number}", self.folder
                        )
                        continue
                    seen += 1
                    where = f"{self.path}, line {number}"
                    try:
                        row = self._row(fields, where)
                        self._check_utf8(row, row_lines)
                        record = self.rows.build(row, where)
                    except BadRow as error:
                        stats.bad(error)
                        continue
                    yield offset, where, record
            except csv.Error as error:
                raise GraftError(f"{self.path}, line {reader.line_num}: malformed CSV ({error})") from None
        if not self.header:
            raise GraftError(f"{self.path}, line 1: empty file (no header)")
        if not seen:
            raise GraftError(f"{self.path}, line 2: empty file (a header {quoted(self.header)} but no rows)")

    def load(self, key: int) -> Record:
        lines = (self.decode(raw)[0] for raw in self._lines_at(key))
        fields = next(csv.reader(lines, **self.dialect))
        return self.rows.build(dict(zip(self.header, fields, strict=True)), f"{self.path}, byte {key}")

    def _row(self, fields: list[str], where: str) -> dict[str, str]:
        n, expected = len(fields), len(self.header)
        if n < expected:
            raise BadRow(
                "wrong field count",
                f"{where}, column {quoted([self.header[n]])}: missing (the row has {n} fields, the header {expected})",
            )
        if n > expected:
            raise BadRow(
                "wrong field count",
                f"{where}, column {expected + 1}: the row has {n} fields but the header only {expected} "
                f"({quoted(self.header)}); is a delimiter inside unquoted text?",
            )
        return dict(zip(self.header, fields, strict=True))

    def _check_utf8(self, row: Mapping[str, str], lines: list[tuple[int, int, bytes, int | None]]) -> None:
        bad_lines = [line for line in lines if line[3] is not None]
        if not bad_lines:
            return
        for column in self.rows.mapping:  # bad bytes in a column nobody reads do no harm
            if has_bad_utf8(row[column]):
                number, offset, raw, index = bad_lines[0]
                raise self.bad_text(f"{self.path}, line {number}", column, raw[index], offset + index)


class TsvSource(CsvSource):
    """Tab-separated values with a header line. Fields are never quoted (as in GLUE's files)."""

    format = "tsv"
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}


class JsonlSource(Source):
    """One JSON object per line; the first object's keys give the columns."""

    format = "jsonl"

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        check_file(self.path)
        seen = 0
        with open(self.path, "rb") as f:
            for number, offset, raw in read_lines(f):
                if not raw.strip():
                    continue
                seen += 1
                where = f"{self.path}, line {number}"
                try:
                    record = self._parse(raw, where, offset)
                except BadRow as error:
                    stats.bad(error)
                    continue
                yield offset, where, record
        if not seen:
            raise GraftError(f"{self.path}, line 1: empty file (no JSON lines)")

    def load(self, key: int) -> Record:
        return self._parse(next(self._lines_at(key)), f"{self.path}, byte {key}", key)

    def _parse(self, raw: bytes, where: str, offset: int) -> Record:
        text, bad = self.decode(raw)
        try:
            row = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise BadRow(
                "malformed JSON", f"{where}, char {error.colno}: malformed JSON ({error.msg})"
            ) from None
        except DuplicateKey as error:
            raise BadRow(
                "duplicate key",
                f"{where}, column {quoted([str(error)])}: the object has the key twice, so its value is ambiguous",
            ) from None
        except RecursionError:
            raise BadRow("malformed JSON", f"{where}: malformed JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise BadRow("malformed JSON", f"{where}: expected a JSON object, got {type(row).__name__}")
        if self.rows is None:
            self.rows = self.options.resolve(row, where, self.folder)
        if bad is not None:
            for column in self.rows.mapping:
                if has_bad_utf8(row.get(column)):
                    raise self.bad_text(where, column, raw[bad], offset + bad)
        return self.rows.build(row, where)


class ConllSource(Source):
    """CoNLL-style columns: one token per line, its tag in the last column, a blank line between
    sentences; ``-DOCSTART-`` lines are skipped. A sentence's key is the offset of its first line."""

    format = "conll"

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        super().__init__(path, options)
        keys = [key for key in ("tokens", "tags") if key not in self.options.ignore]
        self.rows = self.options.builder({key: key for key in keys})

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        check_file(self.path)
        seen = 0
        with open(self.path, "rb") as f:
            sentence: list[tuple[int, int, bytes]] = []
            for line in chain(read_lines(f), [(0, 0, b"")]):  # the final blank line ends the last sentence
                raw = line[2]
                if raw.strip() and not raw.startswith(b"-DOCSTART-"):
                    sentence.append(line)
                    continue
                if not sentence:
                    continue
                seen += 1
                (number, offset, _), lines, sentence = sentence[0], sentence, []
                try:
                    record = self._sentence(lines)
                except BadRow as error:
                    stats.bad(error)
                    continue
                yield offset, f"{self.path}, line {number}", record
        if not seen:
            raise GraftError(f"{self.path}, line 1: empty file (no sentences)")

    def load(self, key: int) -> Record:
        lines = takewhile(lambda raw: raw.strip(), self._lines_at(key))
        return self._sentence([(0, key, raw) for raw in lines])

    def _sentence(self, lines: list[tuple[int, int, bytes]]) -> Record:
        tokens, tags = [], []
        tagged = "tags" in self.rows.mapping  # predict reads the tokens alone: a tag may be missing
        for number, offset, raw in lines:
            text, bad = self.decode(raw)
            parts = text.split()
            where = f"{self.path}, line {number}"
            if len(parts) < 1 + tagged:
                raise BadRow(
                    "malformed CoNLL",
                    f"{where}, column 'tags': expected a token and a tag, got {shown(text.strip())}",
                )
            if bad is not None and (has_bad_utf8(parts[0]) or (tagged and has_bad_utf8(parts[-1]))):
                column = "tokens" if has_bad_utf8(parts[0]) else "tags"
                raise self.bad_text(where, column, raw[bad], offset + bad)
            tokens.append(parts[0])
            tags.append(parts[-1])
        return self.rows.build({"tokens": tokens, "tags": tags}, f"{self.path}, line {lines[0][0]}")


class SquadSource(Source):
    """SQuAD-style JSON: ``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``, one record
    per question. The document is one JSON value, so its records are held in memory."""

    format = "squad"

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        super().__init__(path, options)
        keys = [key for key in ("id", "question", "context", "answers") if key not in self.options.ignore]
        self.rows = self.options.builder({key: key for key in keys})
        self.records: list[Record] = []

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        check_file(self.path)
        raw = Path(self.path).read_bytes()
        text, bad = self.decode(raw)
        try:
            document = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise GraftError(
                f"{self.path}, line {error.lineno}, char {error.colno}: malformed JSON ({error.msg})"
            ) from None
        except DuplicateKey as error:
            raise GraftError(
                f"{self.path}, column {quoted([str(error)])}: an object has the key twice, so its value "
                "is ambiguous"
            ) from None
        except RecursionError:
            raise GraftError(f"{self.path}, line 1: malformed JSON (nested too deeply)") from None
        if not isinstance(document, dict) or not isinstance(document.get("data"), list):
            raise GraftError(
                f"{self.path}, line 1, column 'data': not SQuAD-style JSON (expected {{'data': [...]}})"
            )
        self.records = []
        for a, article in enumerate(document["data"]):
            for p, paragraph in enumerate(article.get("paragraphs", [])):
                for q, qa in enumerate(paragraph.get("qas", [])):
                    row = len(self.records)
                    where = f"{self.path}, row {row} (data[{a}].paragraphs[{p}].qas[{q}])"
                    try:
                        record = self._record(paragraph, qa, where, raw, bad)
                    except BadRow as error:
                        stats.bad(error)
                        continue
                    self.records.append(record)
                    yield row, where, record
        if not self.records and not stats.n_skipped:
            raise GraftError(f"{self.path}, line 1, column 'qas': empty file (no questions)")

    def load(self, key: int) -> Record:
        return self.records[key]

    def _record(self, paragraph: dict, qa: dict, where: str, raw: bytes, bad: int | None) -> Record:
        row = {key: qa[key] for key in ("id", "question", "answers") if key in qa}
        if "context" in paragraph:
            row["context"] = paragraph["context"]
        if qa.get("is_impossible"):  # SQuAD v2: a question with no answer in the context
            row["answers"] = []
        row.setdefault("id", "")
        if isinstance(row.get("answers"), list) and not row["answers"]:
            row["answers"] = {"text": [], "answer_start": []}
        if bad is not None:
            for column, value in row.items():
                if has_bad_utf8(value):
                    raise self.bad_text(where, column, raw[bad], bad)
        return self.rows.build(row, where)


class ParquetSource(Source):
    """Apache Parquet, read one row group at a time; the key is the row number (from 0)."""

    format = "parquet"

    def __init__(self, path: str | Path, options: ReadOptions | None = None) -> None:
        super().__init__(path, options)
        self._starts: list[int] = []  # first row of each row group
        self._group: tuple[int, list[dict]] = (-1, [])  # the row group load() read last

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        check_file(self.path)
        parquet = self._file()
        self.rows = self.options.resolve(parquet.schema_arrow.names, f"{self.path}, schema", self.folder)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        self._starts = [0, *accumulate(sizes)][:-1]
        if not sum(sizes):
            raise GraftError(f"{self.path}, row 0: empty file (no rows)")
        row = -1
        for batch in parquet.iter_batches(columns=list(self.rows.mapping)):
            for values in batch.to_pylist():
                row += 1
                where = f"{self.path}, row {row}"
                try:
                    record = self.rows.build(values, where)
                except BadRow as error:
                    stats.bad(error)
                    continue
                yield row, where, record

    def load(self, key: int) -> Record:
        group = bisect_right(self._starts, key) - 1
        if self._group[0] != group:
            table = self._file().read_row_group(group, columns=list(self.rows.mapping))
            self._group = (group, table.to_pylist())
        return self.rows.build(self._group[1][key - self._starts[group]], f"{self.path}, row {key}")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_group": (-1, [])}

    def _file(self) -> Any:
        if self._handle is None:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise GraftError(f"{self.path}: reading Parquet needs pyarrow: pip install pyarrow") from None
            try:
                self._handle = pq.ParquetFile(self.path)
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                raise GraftError(f"{self.path}, row 0: not a Parquet file ({error})") from None
        return self._handle
