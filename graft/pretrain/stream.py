"""Text files in, batches out, one line at a time: a corpus may be larger than memory."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from graft.data.packing import packed_batch, rows_at
from graft.errors import GraftError

SUFFIXES = (".txt", ".jsonl")


def check_files(files: Sequence[str]) -> list[Path]:
    """The corpus files, each an existing .txt or .jsonl file (checked before any work)."""
    if not files:
        raise GraftError("pretrain.files: no input files (e.g. pretrain.files=[plays.txt])")
    paths = []
    for name in files:
        path = Path(name)
        if path.suffix not in SUFFIXES:
            raise GraftError(f"{path}: a pretraining file is .txt (a document per line) or .jsonl ('text')")
        if not path.is_file():
            raise GraftError(f"{path}: file not found")
        paths.append(path)
    return paths


def documents(files: Sequence[Path]) -> Iterator[str]:
    """Every document of the files, in order: a non-empty line of a .txt file, the "text" of a .jsonl line."""
    for path in files:
        with path.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    yield line.rstrip("\n")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GraftError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise GraftError(f"{path}:{n}: no 'text' string in this record")
                if text.strip():
                    yield text


def forever(files: Sequence[Path], skip: int = 0) -> Iterator[str]:
    """The documents again and again (a stream has no length: training stops at train.max_steps),
    less the first ``skip`` (counted over every pass: a resumed run's position)."""
    while True:
        seen = 0
        for text in documents(files):
            seen += 1
            if skip:
                skip -= 1
                continue
            yield text
        if not seen:
            raise GraftError(f"pretrain: the corpus has no text ({', '.join(map(str, files))})")
        if skip >= seen:  # a resumed run far into the stream: whole passes need no reading
            skip %= seen


Position = tuple[int, int]  # (document, token): where a stream of documents stands


class Batches:
    """Batches of ``size`` rows, and after each one, in ``position``, where the stream stands: the
    (document, token) of the first token no batch has taken, which a checkpoint saves and a
    resumed run starts from (``forever(files, skip=document)``, the document ``token`` tokens in)."""

    def __init__(
        self, rows: Iterator[tuple[Any, Position]], size: int, make: Any, start: Position = (0, 0)
    ) -> None:
        self.rows, self.size, self.make, self.position = rows, size, make, start

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        chunk = list(islice(self.rows, self.size))
        if not chunk:
            raise StopIteration
        self.position = chunk[-1][1]
        return self.make([row for row, _ in chunk])


def tokens(
    texts: Iterator[str], tokenizer: Any, start: Position = (0, 0), eos: bool = True
) -> Iterator[list[int]]:
    """Token ids of each document (+ eos when the tokenizer has one and ``eos``), the first one from
    token ``start[1]`` on."""
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, truncation=False, padding=False, return_tensors=None).input_ids[0] + end
        yield ids[start[1] :] if i == 0 else ids


def mlm_batches(
    texts: Iterator[str],
    head: Any,
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    start: Position = (0, 0),
) -> Batches:
    """Batches of ``batch_size`` documents, each truncated to ``max_length``, masked afresh by the head."""
    rows = (({"text": t}, (d + 1, 0)) for d, t in enumerate(texts, start[0]))
    return Batches(rows, batch_size, lambda records: head.collate(records, tokenizer, max_length), start)


def clm_batches(
    texts: Iterator[str],
    cfg: Any,
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    pack: bool,
    start: Position = (0, 0),
) -> Batches:
    """Rows of ``max_length`` tokens; packed, each holds whole documents (+ eos) attending only to
    themselves, with their own positions; unpacked, a document per row (cut at max_length), padded."""
    ids = tokens(texts, tokenizer, start)
    if pack:
        rows = rows_at(ids, max_length, start)
    else:
        rows = (([doc[:max_length]], (d + 1, 0)) for d, doc in enumerate(ids, start[0]))
    first = cfg.pad_token_id + 1 if cfg.positions_from_padding else 0
    pad = tokenizer.pad_token_id or 0
    return Batches(
        rows, batch_size, lambda chunk: packed_batch(chunk, pad, True, first, cfg.sliding_window), start
    )
