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
    longest = max(lengths)
    widths = sorted({min(max(longest, limit), longest + longest * j // 8) for j in range(9)})
    return min(widths, key=lambda w: (len(bins(lengths, w)) * w * (1 + w * ATTENTION), w))


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
    positions = body.position_ids(None, 0, (1, width))[0]  # (W,) a whole sequence's positions
    tokens = torch.full((R, width), pad_id, dtype=torch.long)
    types = torch.zeros(R, width, dtype=torch.long)
    where = torch.zeros(R, width, dtype=torch.long)  # each position's position within its text
    # each position's text; padding gets ids of its own (n, n + 1, ...) so that it sees only itself
    # (a query that sees nothing would be NaN)
    segment = torch.arange(n, n + R * width).view(R, width)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            tokens[r, start:end] = torch.tensor(ids[i])
            types[r, start:end] = torch.tensor(type_ids[i])
            where[r, start:end] = torch.arange(lengths[i])
            segment[r, start:end] = i
            start = end
    real = segment < n  # (R, W)
    mask = None  # (R, 1, W, W) True where a query may attend a key: its own text's tokens
    if R < n or not bool(real.all()):
        mask = (segment[:, :, None] == segment[:, None, :])[:, None]
    with kernels.frozen(body, store):  # the weights stay as they are (and packed) for the call
        hidden = body(tokens, mask, token_type_ids=types, position_ids=positions[where]).last_hidden_state
    flat = hidden.reshape(R * width, -1)[real.view(-1)].float()  # (real tokens, H)
    sums = torch.zeros(n, flat.shape[1]).index_add_(0, segment[real], flat)  # (N, H)
    return sums / torch.tensor(lengths, dtype=torch.float32)[:, None]
