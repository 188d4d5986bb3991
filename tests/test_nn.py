"""The core pieces on their own: positions, masks, the cache, the config's checks."""

from __future__ import annotations

import pytest
import torch

from graft.errors import GraftError
from graft.nn import KVCache, RelativePositionBias, TransformerConfig, build_mask
from graft.nn.positions import sinusoidal_table


def test_sinusoidal_table_equals_distilbert_reference():
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    expected = torch.empty(64, 32)
    create_sinusoidal_embeddings(64, 32, expected)
    assert (sinusoidal_table(64, 32) - expected).abs().max() <= 1e-7


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_equal_t5(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 20)[:, None]
    expected = T5Attention._relative_position_bucket(relative, bidirectional, 32, 128)
    got = RelativePositionBias(
        num_heads=4, num_buckets=32, max_distance=128, bidirectional=bidirectional
    ).bucket(relative)
    assert torch.equal(expected, got)


def test_relative_position_bias_shape():
    bias = RelativePositionBias(num_heads=4)(q_len=3, k_len=5, offset=2)
    assert bias.shape == (1, 4, 3, 5)


def test_mask_causal_with_cache_offset_and_padding():
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    mask = build_mask(padding, q_len=2, k_len=4, causal=True)  # 2 new queries after 2 cached keys
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert mask[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_mask_keeps_a_padding_query_attending_to_itself():
    padding = torch.tensor([[0, 0, 1]])  # left padding: the first query has no real key before it
    mask = build_mask(padding, q_len=3, k_len=3, causal=True)
    assert mask[0, 0].any(dim=-1).all()


def test_mask_sliding_window():
    mask = build_mask(None, q_len=5, k_len=5, causal=True, sliding_window=2)
    assert mask[0, 0].sum(-1).tolist() == [1, 2, 2, 2, 2]


def test_mask_none_without_padding_for_encoders():
    assert build_mask(None, 4, 4, causal=False) is None
    assert build_mask(torch.ones(2, 4), 4, 4, causal=False) is None


def test_kv_cache_grows_reorders_and_crops():
    cache = KVCache(num_layers=1)
    k = torch.randn(2, 3, 50, 4)
    cache.update(0, k[:, :, :40], k[:, :, :40])
    keys, _ = cache.update(0, k[:, :, 40:], k[:, :, 40:])  # past the first buffer's 64 slots? no: 40 + 10
    assert torch.equal(keys, k)
    more = torch.randn(2, 3, 30, 4)
    keys, _ = cache.update(0, more, more)  # grows the buffer
    assert torch.equal(keys, torch.cat([k, more], dim=2)) and cache.length == 80
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0][0, :, :80], torch.cat([k, more], dim=2)[1])
    cache.crop(10)
    assert cache.length == 10


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"position": "alibi"}, "position='alibi' is not one of"),
        ({"activation": "gelu2"}, "activation='gelu2' is not one of"),
        ({"num_heads": 5}, "hidden_size 32 is not divisible by num_heads 5"),
        ({"num_kv_heads": 3}, "num_heads 4 is not a multiple of num_kv_heads 3"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    base = dict(family="bert", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8)
    with pytest.raises(GraftError, match=message.replace("(", r"\(")):
        TransformerConfig(**{**base, **changes})


def test_config_round_trips_and_suggests_misspelled_keys():
    cfg = TransformerConfig(
        family="gpt2", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8
    )
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(GraftError, match="unknown key 'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        TransformerConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})
