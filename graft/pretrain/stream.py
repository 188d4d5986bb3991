"""Text files in, batches out, one line at a time: a corpus may be larger than memory."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from graft.data.masking import mask_tokens
from graft.data.packing import pack_pieces, packed_batch, rows_at
from graft.errors import GraftError
from graft.tasks.collate import window

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


def mlm_windows(
    texts: Iterator[str], tokenizer: Any, width: int, whole_word: bool, start: Position = (0, 0)
) -> Iterator[tuple[tuple[list[int], list[int]], Position]]:
    """Each document's tokens (no special tokens) in consecutive windows of at most ``width``, with
    their word index in the window (-1: none) and, after each, where the stream stands: every token
    is in one window, none is cut off. A window ends between two words when ``whole_word`` (a word
    longer than a window is cut between its tokens), else at ``width`` tokens. The cuts depend only
    on where the document's windowing began, so a run resumed at (document, token) cuts the same."""
    for d, text in enumerate(texts, start[0]):
        enc = tokenizer.encode(
            text, add_special_tokens=False, truncation=False, padding=False, return_tensors=None
        )
        ids, words = enc.input_ids[0], enc.word_ids[0]
        begin = start[1] if d == start[0] else 0
        while True:  # a document of no tokens still gives one row (its special tokens), as before
            end = min(begin + width, len(ids))
            if whole_word and end < len(ids) and words[end] is not None and words[end] == words[end - 1]:
                first = end  # back to where the word cut at ``end`` begins, unless it fills the window
                while first > begin and words[first - 1] == words[end]:
                    first -= 1
                end = first if first > begin else end
            known = [w for w in words[begin:end] if w is not None]
            low = min(known, default=0)
            row = [-1 if w is None else w - low for w in words[begin:end]]  # words from 0 in each window
            yield (ids[begin:end], row), (d, end) if end < len(ids) else (d + 1, 0)
            if end >= len(ids):
                break
            begin = end


def mlm_batches(
    texts: Iterator[str],
    head: Any,
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    pack: bool = True,
    start: Position = (0, 0),
) -> Batches:
    """Batches of ``batch_size`` rows of ``max_length`` tokens at most, made of windows of documents
    (``mlm_windows``), each between the tokenizer's special tokens (a long document fills several
    windows, none is truncated), masked afresh by the head as its collate does (80/10/10, whole
    words). Packed, a row holds as many whole windows as fit, each attending only to itself with its
    own positions (as clm's rows); unpacked, a window per row, padded to the batch's longest.
    Either way the masks are drawn over the batch's real tokens alone: never a special token or a pad."""
    if tokenizer.mask_token_id is None:
        raise GraftError("masked-lm: the tokenizer has no mask token (mask_token in tokenizer_config.json)")
    # the special tokens around a text: the leading ones of an encoding of "a", and the trailing ones
    one = tokenizer.encode("a", truncation=False, padding=False, return_tensors=None)
    ids, special = one.input_ids[0], one.special_tokens_mask[0]
    lead = next(i for i, s in enumerate(special) if not s)
    trail = next(i for i, s in enumerate(reversed(special)) if not s)
    prefix, suffix = ids[:lead], ids[len(ids) - trail :]
    row_width = window(head.config, tokenizer, max_length)
    width = row_width - len(prefix) - len(suffix)
    if width < 1:
        raise GraftError(
            f"data.max_length: {max_length} leaves no room for text between the {len(prefix) + len(suffix)}"
            " special tokens of an MLM row"
        )
    pad = tokenizer.pad_token_id or 0
    vocab = min(len(tokenizer), head.config.vocab_size)  # random replacements: ids the model has
    first = head.config.first_position

    def make(rows: list[list[tuple[list[int], list[int]]]]) -> dict[str, Any]:
        batch = packed_batch([[prefix + ids + suffix for ids, _ in row] for row in rows], pad, False, first)
        ids, documents = batch["input_ids"], batch["documents"]  # (B, T) each
        maskable = torch.zeros(ids.shape, dtype=torch.bool)
        words = torch.full(ids.shape, -1, dtype=torch.long)
        for b, row in enumerate(rows):
            at, word = 0, 0  # each window's words follow the row's earlier ones: one draw per word
            for window_ids, window_words in row:
                k, n = at + len(prefix), len(window_ids)
                maskable[b, k : k + n] = True  # special tokens and padding are never masked
                words[b, k : k + n] = torch.tensor([w + word if w >= 0 else -1 for w in window_words])
                at, word = k + n + len(suffix), word + max(window_words, default=-1) + 1
        inputs, labels = mask_tokens(
            ids,
            maskable,
            tokenizer.mask_token_id,
            vocab,
            head.generator,
            head.mask_probability,
            words if head.whole_word else None,
        )  # (B, T) each
        if pack:  # block-diagonal attention, positions restarting per window
            batch |= {"input_ids": inputs, "labels": labels}
        else:  # as before packing: a window per row, a padding mask
            batch = {"input_ids": inputs, "attention_mask": (documents >= 0).long(), "labels": labels}
        if head.config.type_vocab_size:  # as model_inputs: segment 0 throughout, none for families without
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch

    windows = mlm_windows(texts, tokenizer, width, head.whole_word, start)
    rows = pack_pieces(windows, row_width, pack, length=lambda w: len(prefix) + len(w[0]) + len(suffix))
    return Batches(rows, batch_size, make, start)


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
    themselves, with their own positions; unpacked, a document per row, padded, a longer one in
    consecutive windows of max_length (each a row with positions from the first, as a document
    alone): every token is in a row either way."""
    rows = rows_at(tokens(texts, tokenizer, start), max_length, start, pack)
    first = cfg.first_position
    pad = tokenizer.pad_token_id or 0
    return Batches(
        rows, batch_size, lambda chunk: packed_batch(chunk, pad, True, first, cfg.sliding_window), start
    )
