"""Text files in, batches out, one line at a time: a corpus may be larger than memory."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from graft.data.packing import packed_batch, stream_rows
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


def forever(files: Sequence[Path]) -> Iterator[str]:
    """The documents again and again (a stream has no length: training stops at train.max_steps)."""
    while True:
        seen = False
        for text in documents(files):
            seen = True
            yield text
        if not seen:
            raise GraftError(f"pretrain: the corpus has no text ({', '.join(map(str, files))})")


def mlm_batches(
    texts: Iterator[str], head: Any, tokenizer: Any, batch_size: int, max_length: int
) -> Iterator[dict]:
    """Batches of ``batch_size`` documents, each truncated to ``max_length``, masked afresh by the head."""
    while True:
        records = [{"text": t} for t in islice(texts, batch_size)]
        if not records:
            return
        yield head.collate(records, tokenizer, max_length)


def clm_batches(
    texts: Iterator[str], cfg: Any, tokenizer: Any, batch_size: int, max_length: int, pack: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Rows of ``max_length`` tokens; packed, each holds whole documents (+ eos) attending only to
    themselves, with their own positions; unpacked, a document per row (cut at max_length), padded."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (
        tokenizer.encode(t, truncation=False, padding=False, return_tensors=None).input_ids[0] + eos
        for t in texts
    )
    rows = stream_rows(ids, max_length) if pack else ([doc[:max_length]] for doc in ids)
    first = cfg.pad_token_id + 1 if cfg.positions_from_padding else 0
    pad = tokenizer.pad_token_id or 0
    while True:
        chunk = list(islice(rows, batch_size))
        if not chunk:
            return
        yield packed_batch(chunk, pad, True, first, cfg.sliding_window)
