"""Sentence embeddings of a batch of texts of mixed lengths, packed instead of padded.

The requests a server batches come in every length. Padded to the longest, a forward over them
computes mostly padding: BBC News titles and first sentences in arrival order are 48% real tokens
in batches of 32, and the linear layers, most of an encoder's work, cost the same for a pad as
for a word; one thread's CPU time per text was 5.9 ms padded against 3.0 ms in batches sorted by
length (graft embed's offline order), which a server cannot wait for. Packed, several texts share
a row of the batch's longest length (first fit, longest first), each with its own positions and
attending only to itself (a block-diagonal mask), so nearly every position is a real token; the
rows' attention is a little wider than each text's own, a small part of the work at these lengths.

Only where that gives each text exactly what it gets alone: an encoder reading token ids with
absolute or rotary positions (graft.data.packing's ``packable``); other models get the padded forward.
"""

from __future__ import annotations

import torch

from graft import kernels
from graft.nn import Transformer


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


# a row's attention against its linear layers, per position per key: a row of W positions costs
# about W * (1 + W * ATTENTION) (all-MiniLM-L6-v2, one thread: attention is about a tenth of a forward)
ATTENTION = 1 / 128


def row_width(lengths: list[int], limit: int) -> int:
    """The width of the rows the texts pack into: the longest text's, or up to twice it (at most
    ``limit``) where fewer rows fill better. Rows as wide as the longest text are 86-90% real
    tokens for BBC titles, first sentences and the book's questions in batches of 8-32, 97-98% at
    the best width; with attention's share of a wider row counted, one thread's CPU per text on
    batches of 8, 12, 16 and 32 went 4.40, 4.06, 3.76, 3.58 -> 4.21, 3.66, 3.76, 3.46 ms (a busy
    core: best of 6)."""
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


@torch.inference_mode()
def embed_packed(
    body: Transformer,
    ids: list[list[int]],
    type_ids: list[list[int]],
    pad_id: int,
    store: dict | None = None,
) -> torch.Tensor:
    """(N, H) mean-pooled hidden states of the N token-id lists, as ``graft.tasks.embedding.embed``
    gives them (to float rounding), in one forward over the packed rows."""
    lengths = [len(row) for row in ids]
    width = row_width(lengths, body.config.max_positions // 2)
    rows = bins(lengths, width)
    R, n = len(rows), len(ids)
    order = [i for row in rows for i in row]  # the texts as they lie in the rows, row after row
    starts = []  # where each text of ``order`` begins in the flattened (R * W) batch
    for r, row in enumerate(rows):
        at = r * width
        for i in row:
            starts.append(at)
            at += lengths[i]
    count = torch.tensor([lengths[i] for i in order])  # (N,)
    text = torch.tensor(order).repeat_interleave(count)  # (T,) each real token's text
    within = torch.arange(len(text)) - (count.cumsum(0) - count).repeat_interleave(
        count
    )  # (T,) its place in it
    place = torch.tensor(starts).repeat_interleave(count) + within  # (T,) its place in the flat batch
    positions = body.position_ids(None, 0, (1, width))[0]  # (W,) a whole sequence's positions
    tokens = torch.full((R * width,), pad_id, dtype=torch.long)
    tokens[place] = torch.tensor([t for i in order for t in ids[i]])
    types = torch.zeros(R * width, dtype=torch.long)
    types[place] = torch.tensor([t for i in order for t in type_ids[i]])
    where = torch.zeros(R * width, dtype=torch.long)  # each position's position within its text
    where[place] = within
    # each position's text; padding gets ids of its own (n, n + 1, ...) so that it sees only itself
    # (a query that sees nothing would be NaN)
    segment = torch.arange(n, n + R * width)
    segment[place] = text
    tokens, types, where, segment = (t.view(R, width) for t in (tokens, types, where, segment))
    mask = None  # (R, 1, W, W) True where a query may attend a key: its own text's tokens
    if R < n or len(place) < R * width:
        mask = (segment[:, :, None] == segment[:, None, :])[:, None]
    with kernels.frozen(body, store):  # the weights stay as they are (and packed) for the call
        hidden = body(tokens, mask, token_type_ids=types, position_ids=positions[where]).last_hidden_state
    flat = hidden.reshape(R * width, -1)[place].float()  # (T, H) the real tokens, in the batch's order
    sums = torch.zeros(n, flat.shape[1]).index_add_(0, text, flat)  # (N, H)
    return sums / torch.tensor(lengths, dtype=torch.float32)[:, None]
