"""Sequence packing: several documents in one row, each as if it were alone (chapter 4).

Padding every document to the longest wastes the compute of the pad tokens; run_clm's answer,
concatenating everything and cutting it into rows, lets a document attend to the one before it and
numbers positions across both. Here documents are packed whole into rows (one longer than a row is
cut into row-sized pieces, each its own document), positions restart at every document (from
``first_position``: RoBERTa numbers from pad_token_id + 1), and the attention mask is
block-diagonal (causal and within the sliding window for decoders), so every document's logits and
loss are what they would be unpacked. Causal LM packs documents cut to row-sized pieces
(``rows_at``); masked LM packs windows of documents, each between its own special tokens
(graft.pretrain.stream), through the same ``pack_pieces``; ``packable`` says which models' outputs
stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from graft.errors import GraftError

IGNORE = -100  # label of padding and of each document's first token (nothing before it predicts it)


def stream_rows(docs: Iterable[Sequence[int]], width: int) -> Iterator[list[list[int]]]:
    """Documents -> rows of at most ``width`` tokens, each row a list of whole documents, in order
    (a row is closed when the next document does not fit; a document longer than a row is cut),
    one row at a time: the documents may be a stream larger than memory."""
    return (row for row, _ in rows_at(docs, width))


def rows_at(
    docs: Iterable[Sequence[int]], width: int, start: tuple[int, int] = (0, 0), pack: bool = True
) -> Iterator[tuple[list[list[int]], tuple[int, int]]]:
    """``stream_rows`` with, after each row, where the stream stands: (document, token) of the first
    token no row has taken yet, counted from ``start`` (the first document begins ``start[1]`` tokens
    in: a document cut across rows is resumed where it was cut, in the same row-sized pieces).
    Without ``pack``, every row holds one piece: a document, or one of the consecutive ``width``-token
    windows of a longer one (each its own document, as a cut piece is packed), so no token is lost."""
    return pack_pieces(pieces_at(docs, width, start), width, pack)


def pieces_at(
    docs: Iterable[Sequence[int]], width: int, start: tuple[int, int] = (0, 0)
) -> Iterator[tuple[list[int], tuple[int, int]]]:
    """Each document whole, or cut into consecutive ``width``-token pieces when longer, each piece
    with where the stream stands after it (as ``rows_at`` counts)."""
    if width < 1:
        raise GraftError(f"packing: the row width must be at least 1, found {width}")
    for d, doc in enumerate(docs, start[0]):
        skip = start[1] if d == start[0] else 0
        for begin in range(0, len(doc), width):
            end = begin + width
            yield list(doc[begin:end]), (d, skip + end) if end < len(doc) else (d + 1, 0)


def pack_pieces(
    pieces: Iterable[tuple[Any, tuple[int, int]]],
    width: int,
    pack: bool = True,
    length: Callable[[Any], int] = len,
) -> Iterator[tuple[list[Any], tuple[int, int]]]:
    """Pieces of at most ``width`` tokens (each with where the stream stands after it) -> rows of
    whole pieces in order, a row closed when the next piece does not fit (without ``pack``: a piece
    per row), each with where the stream stands after its last piece. ``length``: a piece's tokens
    (masked LM's pieces carry their word indices beside their ids)."""
    row: list[Any] = []
    used, after = 0, (0, 0)
    for piece, position in pieces:
        n = length(piece)
        if row and (not pack or used + n > width):
            yield row, after
            row, used = [], 0
        row.append(piece)
        used += n
        after = position
    if row:
        yield row, after


def chunks_at(
    docs: Iterable[Sequence[int]], width: int, start: tuple[int, int] = (0, 0)
) -> Iterator[tuple[list[int], tuple[int, int]]]:
    """The documents end to end, cut into rows of exactly ``width`` tokens (run_clm's grouping, which
    T5's span corruption pretrains on), each with where the stream stands after it, as ``rows_at``
    says it; the last tokens, short of a row, are dropped."""
    if width < 1:
        raise GraftError(f"packing: the row width must be at least 1, found {width}")
    row: list[int] = []
    for d, doc in enumerate(docs, start[0]):
        skip = start[1] if d == start[0] else 0
        begin = 0
        while begin < len(doc):
            take = list(doc[begin : begin + width - len(row)])
            row += take
            begin += len(take)
            if len(row) == width:
                yield row, (d, skip + begin) if begin < len(doc) else (d + 1, 0)
                row = []


def pack_rows(docs: Iterable[Sequence[int]], width: int) -> list[list[list[int]]]:
    """``stream_rows`` as a list."""
    return list(stream_rows(docs, width))


def packed_batch(
    rows: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    causal: bool,
    first_position: int = 0,
    sliding_window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rows of documents (from ``pack_rows``) -> the model's inputs.

    input_ids, position_ids, labels and documents are (B, T) (documents: the index of each token's
    document in its row, -1 on padding); attention_mask is (B, 1, T, T) bool, True where a query may
    attend a key: its own document only (and, causal, no later key, none ``sliding_window`` or more
    back).
    """
    width = max(sum(len(d) for d in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.full((B, width), first_position, dtype=torch.long)
    documents = torch.full((B, width), -1, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for d, doc in enumerate(row):
            end = start + len(doc)
            ids[b, start:end] = torch.tensor(doc, dtype=torch.long)
            positions[b, start:end] = torch.arange(first_position, first_position + len(doc))
            documents[b, start:end] = d
            labels[b, start + 1 : end] = ids[b, start + 1 : end]  # the first token: nothing predicts it
            start = end
    same = (documents[:, :, None] == documents[:, None, :]) & (documents[:, :, None] >= 0)  # (B, T, T)
    if causal:
        q = torch.arange(width)[:, None]  # (T, 1)
        k = torch.arange(width)[None, :]  # (1, T)
        allowed = k <= q
        if sliding_window is not None:
            allowed &= k > q - sliding_window
        same &= allowed[None]
    same |= torch.eye(width, dtype=torch.bool)[None]  # a pad query sees itself: no all-masked (NaN) row
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": same[:, None],  # (B, 1, T, T)
        "labels": labels,
        "documents": documents,
    }


def packable(body: Any) -> bool:
    """Whether a text's output in a packed row is exactly its output alone (a ``graft.nn.Transformer``
    body): token inputs, each position attending only where the block-diagonal mask lets it, with
    positions it is given; not so with a relative position bias (it spans the row), a causal mask or
    sliding window (serving packs encoders only), cross-attention or virtual tokens (prompt tuning's,
    which open the row, not each text)."""
    cfg = body.config
    return (
        cfg.inputs == "tokens"
        and not cfg.causal
        and cfg.sliding_window is None
        and not cfg.cross_attention
        and body.relative is None
        and not body.virtual_tokens
    )
