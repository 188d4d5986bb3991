"""graft/serve/packing.py: texts packed several to a row give what each gets padded, in every
encoder family; the rows hold every text once, within the width."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_model

from graft.data.packing import packable
from graft.loading import load_model
from graft.models import FAMILIES
from graft.serve.packing import bins, embed_packed, row_width
from graft.tasks.collate import pad
from graft.tasks.pooling import mean_pool

TOKEN_FAMILIES = sorted(
    n for n, f in FAMILIES.items() if f.inputs == "tokens" and not f.encoder_decoder and not f.dual_encoder
)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("kernels", [True, False])
def test_packed_embeddings_equal_padded_ones(tmp_path, family, kernels):
    hf_model(family).save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base", kernels=kernels)
    assert packable(body) == (not FAMILIES[family].decoder)  # a causal mask would see the row's earlier texts
    if not packable(body):
        return
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 1, 9, 30, 2, 2, 11, 30]  # rows of 30: [30], [30], [17, 11, 2], [9, 3, 2, 1, ...]
    ids = [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]  # segment ids reach the model too
    padded_ids, mask = pad(ids, 0)
    padded_types, _ = pad(types, 0)
    with torch.inference_mode():
        hidden = body(padded_ids, mask, token_type_ids=padded_types).last_hidden_state  # (B, T, H)
        expected = mean_pool(hidden, mask)
    torch.testing.assert_close(embed_packed(body, ids, types, 0), expected, atol=1e-5, rtol=0)
    one = embed_packed(body, ids[1:2], types[1:2], 0)  # a lone text: one row, no mask
    torch.testing.assert_close(one, expected[1:2], atol=1e-5, rtol=0)
    wide = [16] + [9] * 6  # rows wider than the longest text (row_width): [16], then [9, 9] in rows of 18
    ids = [torch.randint(3, 99, (n,), generator=g).tolist() for n in wide]
    padded_ids, mask = pad(ids, 0)
    with torch.inference_mode():
        expected = mean_pool(body(padded_ids, mask).last_hidden_state, mask)
    got = embed_packed(body, ids, [[0] * n for n in wide], 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(10))
def test_bins_hold_every_text_once_within_the_width(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 50))]
    rows = bins(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    # first fit: a row at most half full would have taken the items of any later such row
    assert sum(2 * sum(lengths[i] for i in row) <= max(lengths) for row in rows) <= 1


def test_rows_are_widened_only_where_fewer_rows_fill_better_and_never_beyond_the_limit():
    lengths = [16] + [9] * 6  # width 16: each 9 alone, 7 rows of 16 (112 slots); 18: pairs, 4 rows (72)
    assert row_width(lengths, 512) == 18
    assert row_width(lengths, 16) == 16  # the limit holds
    assert row_width([600, 3], 256) == 600  # a text over the limit keeps its own width
    assert row_width([10, 10, 10, 11], 512) == 11  # wider rows would hold no fewer slots


@pytest.mark.parametrize("seed", range(20))
def test_the_row_width_is_the_cheapest_of_the_widths_tried(seed):
    """row_width skips widths that cannot win; the choice is the exhaustive one's: the least cost
    (rows x width x its attention), the narrower width on a tie."""
    from graft.serve.packing import ATTENTION

    rng = random.Random(seed)
    lengths = [rng.randint(2, 60) for _ in range(rng.randint(1, 64))]
    longest, limit = max(lengths), rng.choice([32, 64, 256])
    widths = {min(max(longest, limit), longest + longest * j // 8) for j in range(9)}
    best = min(widths, key=lambda w: (len(bins(lengths, w)) * w * (1 + w * ATTENTION), w))
    assert row_width(lengths, limit) == best
