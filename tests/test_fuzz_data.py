"""Fuzzing the CSV, TSV and JSON-lines readers (issue 12): exactly two outcomes are allowed.

A file either reads into the right records, or fails with a GraftError whose one line names the
file. Never another exception, and never more than a bounded amount of memory: each property runs
in a child process under ``RLIMIT_AS`` (the child's size after its imports plus ``MEMORY``), with a
generous timeout that only catches a reader looping forever.

Hypothesis is derandomized (the same examples on every run) with no example database; the default
run is a few seconds per property, the ``slow`` variants try many more examples.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.data import CANONICAL_KEYS, DEFAULT_ALIASES, load_records
from graft.errors import GraftError

EXAMPLES, SLOW_EXAMPLES = 60, 400
MEMORY = 1 << 30  # bytes a child may map beyond its size after imports: the biggest file is 16 MiB
HANG = 600  # seconds: a child that runs longer is stuck, not slow (the default run takes a few)
ALIASES = {alias for aliases in DEFAULT_ALIASES.values() for alias in aliases}
ENCODINGS = ("utf-8", "utf-8-sig", "cp1252", "latin-1")
TESTS = Path(__file__).resolve().parent  # the child imports this file, and graft from the same tree


# --- files that are well formed: they must read back exactly ----------------------------------


def encodable(encoding: str) -> st.SearchStrategy[str]:
    """Text that ``encoding`` can write (all of Unicode but surrogates for UTF-8)."""
    if encoding.startswith("utf-8"):
        return st.text(max_size=40)
    alphabet = [chr(c) for c in range(256) if _encodes(chr(c), encoding)]
    return st.text(alphabet=st.sampled_from(alphabet), max_size=40)


def _encodes(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def table(draw: st.DrawFn, fmt: str) -> tuple[bytes, str, list[dict[str, str]] | None]:
    """(file bytes, the encoding option that reads it, the records it holds; None: it must fail)."""
    encoding = "utf-8" if fmt == "jsonl" else draw(st.sampled_from(ENCODINGS))
    text = encodable(encoding)
    terminator = draw(st.sampled_from(["\n", "\r\n"]))
    if fmt == "tsv":  # TSV is never quoted: no tab or line break inside a field
        text = text.filter(lambda s: not set(s) & {"\t", "\n", "\r"})
    elif fmt == "csv" and terminator == "\n":  # csv.writer quotes only what its line terminator holds
        text = text.filter(lambda s: "\r" not in s)
    label = text.filter(lambda s: s != "")  # an empty label is a bad row, tested elsewhere
    extras = draw(
        st.lists(
            text.map(str.strip).filter(lambda s: s and s not in ALIASES and "\x00" not in s),
            max_size=2,
            unique=True,
        )
    )
    header = draw(st.permutations(["text", "label", *extras]))
    rows = draw(
        st.lists(
            st.fixed_dictionaries({name: label if name == "label" else text for name in header}),
            min_size=1,
            max_size=8,
        )
    )
    if fmt == "jsonl":
        lines = [json.dumps(row, ensure_ascii=draw(st.booleans())) + "\n" for row in rows]
        content = "".join(lines)
    elif fmt == "tsv":
        content = "".join(
            "\t".join(fields) + "\n" for fields in [header, *([r[h] for h in header] for r in rows)]
        )
    else:
        out = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        writer = csv.writer(out, quoting=quoting, lineterminator=terminator)
        writer.writerow(header)
        writer.writerows([row[h] for h in header] for row in rows)
        content = out.getvalue()
    option = "auto" if encoding.startswith("utf-8") else encoding
    records = [{"text": row["text"], "label": row["label"]} for row in rows]
    if draw(st.integers(0, 4)) == 0:  # a column read twice: an error, whichever copy is right
        if fmt == "jsonl":
            content = "".join(line.replace("{", '{"label": "other", ', 1) for line in lines)
        else:
            content = ("label\t" if fmt == "tsv" else "label,") + content
        return content.encode(encoding), option, None
    return content.encode(encoding), option, records


def check_round_trip(fmt: str, folder: Path, examples: int) -> None:
    @settings(**SETTINGS, max_examples=examples)
    @given(table(fmt))
    def round_trip(case: tuple[bytes, str, list[dict[str, str]] | None]) -> None:
        content, encoding, records = case
        path = folder / f"data.{fmt}"
        path.write_bytes(content)
        if records is None:
            with pytest.raises(GraftError, match=f"{re.escape(str(path))}, line 1, column 'label': .*twice"):
                list(load_records(path, encoding=encoding))
            return
        assert list(load_records(path, encoding=encoding)) == records

    round_trip()


# --- hostile files: read correctly or fail in one line naming the file ----------------------------

SPECIAL = [
    b"\x00",
    codecs.BOM_UTF8,
    codecs.BOM_UTF16_LE,
    b'"',
    b"\r",
    b"\n",
    b",",
    b"\t",
    b"{",
    b"}",
    b"\xa3",
    b"\xff",
]


@st.composite
def hostile(draw: st.DrawFn, fmt: str) -> bytes:
    """A well-formed file, mangled: bytes inserted, cut or repeated, huge fields, a repeated column."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=400))
    content = bytearray(draw(table(fmt))[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(content)))
        kind = draw(st.sampled_from(["insert", "special", "delete", "huge", "duplicate", "extra", "missing"]))
        if kind == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "special":
            content[at:at] = draw(st.sampled_from(SPECIAL)) * draw(st.integers(1, 3))
        elif kind == "delete":
            del content[at : at + draw(st.integers(1, 16))]
        elif kind == "huge":  # a field of up to 16 MiB, maybe inside an unclosed quote
            opener = draw(st.sampled_from([b"", b'"', b'{"text": "']))
            content[at:at] = opener + b"x" * draw(st.sampled_from([1 << 10, 1 << 20, 16 << 20]))
        elif kind == "duplicate":  # the first line's first name again, as a column or a JSON key
            first, _, rest = bytes(content).partition(b"\n")
            if fmt == "jsonl":
                first = first.replace(b'"text"', b'"text": "a", "text"', 1)
            else:
                sep = b"\t" if fmt == "tsv" else b","
                first = first.rstrip(b"\r") + sep + first.split(sep)[0]
            content[:] = first + b"\n" + rest
        else:  # a row with a field more, or a field less
            line = bytes(content).split(b"\n")
            row = draw(st.integers(0, len(line) - 1))
            sep = b"\t" if fmt == "tsv" else b","
            line[row] = line[row] + sep + b"more" if kind == "extra" else line[row].rpartition(sep)[0]
            content[:] = b"\n".join(line)
    return bytes(content)


def check_hostile(fmt: str, folder: Path, examples: int) -> None:
    @settings(**SETTINGS, max_examples=examples)
    @given(
        hostile(fmt),
        st.sampled_from(["auto", "utf-8", "cp1252", "latin-1"]),
        st.booleans(),
        st.booleans(),
    )
    def read_or_refuse(content: bytes, encoding: str, skip_bad_rows: bool, replace_bad_utf8: bool) -> None:
        path = folder / f"data.{fmt}"
        path.write_bytes(content)
        options = {"encoding": encoding, "skip_bad_rows": skip_bad_rows, "replace_bad_utf8": replace_bad_utf8}
        try:
            records = list(load_records(path, **options))
        except GraftError as error:
            message = str(error)
            assert message.splitlines() == [message] and str(path) in message, message
            assert len(message) < 1000, message[:2000]  # a huge field is cut, not printed
            return
        for record in records:
            assert set(record) <= set(CANONICAL_KEYS), record.keys()
            assert all(isinstance(record[key], str) for key in ("text", "label") if key in record)

    read_or_refuse()


SETTINGS = {
    "derandomize": True,
    "database": None,
    "deadline": None,  # time is bounded per child process, not per example
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}
PROPERTIES = {"round_trip": check_round_trip, "hostile": check_hostile}


# --- each property in a child process with bounded memory --------------------------------------


def child(name: str, fmt: str, folder: str, examples: int) -> None:
    """Run one property under RLIMIT_AS: the memory the child has mapped now, plus MEMORY."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY, resource.RLIM_INFINITY))
    PROPERTIES[name](fmt, Path(folder), examples)


def run_bounded(name: str, fmt: str, examples: int) -> None:
    code = (
        f"import sys; sys.path[:0] = {[str(TESTS), str(TESTS.parent)]!r}; import test_fuzz_data as t; "
        "t.child(*sys.argv[1:4], int(sys.argv[4]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [sys.executable, "-c", code, name, fmt, folder, str(examples)],
            capture_output=True,
            text=True,
            timeout=HANG,
            env=env,
        )
    assert result.returncode == 0, result.stderr[-6000:]


FORMATS = ["csv", "tsv", "jsonl"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PROPERTIES)
def test_fuzz_readers(name, fmt):
    run_bounded(name, fmt, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PROPERTIES)
def test_fuzz_readers_longer(name, fmt):
    run_bounded(name, fmt, SLOW_EXAMPLES)


def test_the_memory_bound_holds_in_the_child():
    # The bound is real: a child that allocates more than MEMORY fails with MemoryError.
    code = (
        f"import sys; sys.path[:0] = {[str(TESTS), str(TESTS.parent)]!r}; import test_fuzz_data as t; "
        "t.PROPERTIES['grow'] = lambda *a: bytearray(2 * t.MEMORY); t.child('grow', 'csv', '.', 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG)
    assert result.returncode != 0 and "MemoryError" in result.stderr
