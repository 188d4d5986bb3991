"""Sentence embeddings and task predictions of a batch of texts of mixed lengths, packed instead
of padded.

The requests a server batches come in every length. Padded to the longest, a forward over them
computes mostly padding: BBC News titles and first sentences in arrival order are 48% real tokens
in batches of 32, and the linear layers, most of an encoder's work, cost the same for a pad as
for a word; one thread's CPU time per text was 5.9 ms padded against 3.0 ms in batches sorted by
length (graft embed's offline order), which a server cannot wait for. Packed, the texts go end to
end in one sequence of their real tokens (``graft.nn.attention.Segments``), each with its own
positions: every layer but attention runs on those tokens alone, and attention lays them out in
rows of about the batch's longest length (first fit, longest first), each text masked off from
the others in its row (a block-diagonal mask). Before session 21 the whole forward ran on those
rows, whose places were 92-93% real tokens at 8-16 texts and 95.5% at 64; on the tokens alone,
one thread's CPU a text fell 3-6% at 8-64 texts, with bitwise the same embeddings.

A task model's records (``predict_packed``: /predict) go the same way: the head's batch is
collated as graft predict collates it, the body runs on its real tokens (``output_packed``), and
the head reads their hidden states put back in the padded layout.

Only where that gives each text exactly what it gets alone: an encoder reading token ids with
absolute or rotary positions (graft.data.packing's ``packable``); other models get the padded forward.
"""

from __future__ import annotations

from typing import Any

import torch

from graft import kernels
from graft.nn import Transformer
from graft.nn.attention import Segments
from graft.nn.transformer import TransformerOutput
from graft.tasks.base import TaskModel


def bins(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``width`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []  # tokens left in each row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


# a row's attention, and the copies of its queries, keys, values and outputs into the rows and
# out again, per place per key: a row of W places costs about W * (1 + W * ATTENTION). (Every other
# layer runs on the real tokens alone, whatever the rows.)
ATTENTION = 1 / 8


def row_width(lengths: list[int], limit: int) -> int:
    """The width of the rows the texts pack into for attention: the longest text's, or up to
    twice it (at most ``limit``) where so many fewer rows fill that their attention costs less.
    All-MiniLM-L6-v2 on BBC titles, first sentences and the book's questions in random order,
    one thread, four interleaved passes over 512 texts, CPU a text against ATTENTION = 1/128
    (the weight from when the linear layers ran on the rows too, padding and all): 1/8 -4.8% at
    16 texts a forward, -0.4% at 64; 1/20 -2.4%, +0.8%; the longest text's width always -3.6%,
    -1.2% (AMD EPYC, Zen 4)."""
    longest, total = max(lengths), sum(lengths)
    best, chosen = None, longest  # the least cost so far, and its width
    for w in sorted({min(max(longest, limit), longest + longest * j // 8) for j in range(9)}):
        # rows filled to the brim are the least a width can cost: no need to pack for a width
        # that costs more even so (the narrower width wins a tie)
        if best is not None and -(-total // w) * w * (1 + w * ATTENTION) >= best:
            continue
        cost = len(bins(lengths, w)) * w * (1 + w * ATTENTION)
        if best is None or cost < best:
            best, chosen = cost, w
    return chosen


def segments_of(
    lengths: list[int], rows: list[list[int]], width: int, first: int | None = None
) -> tuple[Segments, list[int], torch.Tensor, torch.Tensor]:
    """The texts of ``lengths`` end to end in the order of their ``rows`` (``bins``), the first
    ``first`` texts (all, if None) before the others wherever their rows are: the Segments
    attention lays them out by (rows of ``width`` places), that order, (T,) each token's text and
    (T,) each token's place within its own text."""
    n = len(lengths)
    first = n if first is None else first
    order = [i for row in rows for i in row if i < first] + [i for row in rows for i in row if i >= first]
    column = {}  # where each text begins in the flattened (R * W) rows
    for r, row in enumerate(rows):
        at = r * width
        for i in row:
            column[i] = at
            at += lengths[i]
    count = torch.tensor([lengths[i] for i in order])  # (N,)
    text = torch.tensor(order).repeat_interleave(count)  # (T,) each token's text
    starts = count.cumsum(0) - count  # (N,) where each text of ``order`` begins among the tokens
    within = torch.arange(len(text)) - starts.repeat_interleave(count)  # (T,)
    place = torch.tensor([column[i] for i in order]).repeat_interleave(count) + within  # (T,) in the rows
    index = torch.zeros(len(rows) * width, dtype=torch.long)  # (R * W,) the token at each place
    index[place] = torch.arange(len(text))
    # each place's text; an empty one gets an id of its own (n, n + 1, ...) so that it sees only
    # itself (a query that sees nothing would be NaN)
    segment = torch.arange(n, n + len(rows) * width)
    segment[place] = text
    segment = segment.view(len(rows), width)
    mask = (segment[:, :, None] == segment[:, None, :])[:, None]  # (R, 1, W, W)
    return Segments(index, place, mask), order, text, within


def bucket(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of 8 below 512, then to 32 steps an octave (16 below
    1,024, 32 below 2,048...): the token counts a packed forward runs at.

    oneDNN makes a primitive for each shape of a linear layer's input, and a new one costs a
    forward of 16 texts 4.0-5.5 ms more than one it has made (of about 85 ms; all-MiniLM-L6-v2,
    one thread, the weights kept packed; AMD EPYC, Zen 4). A server's batches come in every total
    length: at 32 clients, several hundred of them, more than its cache keeps (1,024 primitives,
    four linear shapes a length), so they were made again and again (and a new server made them
    all). Rounded, the lengths are a few
    dozen, made once; the padding computes about 1.2% more tokens. graft serve at 32 clients, 12
    interleaved pairs of fresh servers: +6% requests a second on average, +13 to 36% in the first
    five pairs; once both had made their primitives (16 pairs after six runs each), the same."""
    step = max(8, 1 << max(0, tokens.bit_length() - 6))
    return -(-tokens // step) * step


def forward_packed(
    body: Transformer, ids: list[list[int]], type_ids: list[list[int]], store: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body's (1, T, H) last hidden states of the N texts' tokens end to end (in the order the
    rows hold the texts), (T,) each token's text (an index into ``ids``) and (T,) its place within
    that text.

    The forward runs on ``bucket(T)`` tokens: texts of padding (token id 0, each in its own segment,
    none longer than the longest text, so that the rows stay as wide) make up the difference, after
    the texts, and are cut off the output."""
    n, lengths = len(ids), [len(row) for row in ids]
    T, longest = sum(lengths), max(lengths)
    if extra := bucket(T) - T:
        pads = [longest] * (extra // longest) + [extra % longest] * (extra % longest > 0)
        lengths += pads
        ids, type_ids = [*ids, *([0] * k for k in pads)], [*type_ids, *([0] * k for k in pads)]
    width = row_width(lengths, body.config.max_positions // 2)
    segments, order, text, within = segments_of(lengths, bins(lengths, width), width, n)
    tokens = torch.tensor([t for i in order for t in ids[i]])[None]  # (1, T + extra)
    types = torch.tensor([t for i in order for t in type_ids[i]])[None]  # (1, T + extra)
    # (1, T + extra): each token's position as in its text alone
    positions = body.position_ids(None, 0, (1, longest))[0][within][None]
    with kernels.frozen(body, store):  # the weights stay as they are (and packed) for the call
        hidden = body(tokens, segments, token_type_ids=types, position_ids=positions).last_hidden_state
    return hidden[:, :T], text[:T], within[:T]


@torch.inference_mode()
def embed_packed(
    body: Transformer,
    ids: list[list[int]],
    type_ids: list[list[int]],
    store: dict | None = None,
) -> torch.Tensor:
    """(N, H) mean-pooled hidden states of the N token-id lists, as ``graft.tasks.embedding.embed``
    gives them (to float rounding), in one forward over the texts end to end (``Segments``): every
    layer but attention runs on their real tokens alone, attention on the rows they pack into."""
    lengths = [len(row) for row in ids]
    hidden, text, _ = forward_packed(body, ids, type_ids, store)
    sums = torch.zeros(len(ids), hidden.shape[-1]).index_add_(0, text, hidden[0].float())  # (N, H)
    return sums / torch.tensor(lengths, dtype=torch.float32)[:, None]


def right_padded(batch: dict[str, Any]) -> bool:
    """Whether a collated batch is token ids, segment ids and a mask of real tokens first, padding
    after, and nothing else the body reads: what ``output_packed`` takes."""
    from graft.tasks.base import BODY_INPUTS

    mask = batch.get("attention_mask")
    if "input_ids" not in batch or mask is None or mask.dim() != 2:
        return False
    if any(k in batch for k in BODY_INPUTS if k not in ("input_ids", "attention_mask", "token_type_ids")):
        return False
    real = mask.bool()
    first = real.long().cumsum(1) == torch.arange(1, mask.shape[1] + 1)  # (B, L) within the leading run
    return bool(first.eq(real).all() and real[:, 0].all())


@torch.inference_mode()
def output_packed(body: Transformer, batch: dict[str, Any], store: dict | None = None) -> TransformerOutput:
    """What ``body(**batch)`` gives a right-padded batch (``right_padded``) at its real tokens (to
    float rounding), computed on those tokens end to end: last_hidden_state (B, L, H), zeros at the
    padding, and the pooler's output from each sequence's first token."""
    B, L = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(1).tolist()
    ids = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths, strict=True)]
    types = batch.get("token_type_ids")
    types = (
        [row[:n] for row, n in zip(types.tolist(), lengths, strict=True)]
        if types is not None
        else [[0] * n for n in lengths]
    )
    hidden, text, within = forward_packed(body, ids, types, store)
    padded = hidden.new_zeros(B * L, hidden.shape[-1]).index_copy_(0, text * L + within, hidden[0])
    padded = padded.view(B, L, -1)  # (B, L, H)
    return TransformerOutput(padded, body.pool(padded))


@torch.inference_mode()
def predict_packed(
    model: TaskModel, tokenizer: Any, records: list[dict[str, Any]], store: dict | None = None, **options: Any
) -> list[dict[str, Any]] | None:
    """graft predict's predictions of ``records`` in one batch, its body's forward on the real tokens
    alone (``output_packed``); None when the head's batch is not one that packs (``right_padded``)."""
    batch = model.head.collate(records, tokenizer, None)
    if not right_padded(batch):
        return None
    logits = model.head(output_packed(model.body, batch, store), batch)
    return model.head.postprocess(logits, batch, **options)
