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


def test_kv_cache_keeps_cross_attention_keys_and_reorders_them():
    cache = KVCache(num_layers=2)
    k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)  # (B, nkv, S, hd): an encoder's output
    assert cache.cross(0) is None
    assert cache.keep_cross(0, k, v) == (k, v) and cache.cross(0) == (k, v) and cache.cross(1) is None
    assert cache.length == 0  # the decoder's own positions are counted apart
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.cross(0)[0], k[[1, 1]]) and torch.equal(cache.cross(0)[1], v[[1, 1]])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"position": "alibi"}, "position='alibi' is not one of"),
        ({"activation": "gelu2"}, "activation='gelu2' is not one of"),
        ({"num_heads": 5}, "hidden_size 32 is not divisible by num_heads 5"),
        ({"num_kv_heads": 3}, "num_heads 4 is not a multiple of num_kv_heads 3"),
        ({"inputs": "video"}, "config: inputs='video' is not one of tokens, patches, audio_frames"),
        (
            {"inputs": "patches", "max_positions": 5, "type_vocab_size": 2},
            "type_vocab_size=2 is for inputs='tokens', not 'patches'",
        ),
        ({"inputs": "audio_frames"}, "inputs='audio_frames' needs position='sinusoidal', not 'learned'"),
        (
            {"inputs": "patches", "position": "rotary"},
            "inputs='patches' needs position='learned', not 'rotary'",
        ),
        ({"inputs": "patches"}, "config: max_positions=512 must be 197 for inputs='patches'"),
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
    with pytest.raises(GraftError, match="unknown key 'hiden_size'; did you mean 'hidden_size'\\?"):
        TransformerConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})


# ---- what the next families stand on: embeddings of one's own, relative positions ---------------


def test_inputs_embeds_and_an_embeddings_module_of_ones_own():
    """Vectors made by another module (patches, audio frames) enter through inputs_embeds and get
    the same positions, norm and dropout; or the stack takes an embeddings module of its own."""
    from torch import nn

    from graft.nn import InputEmbeddings, Transformer

    cfg = TransformerConfig(
        family="bert", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        by_ids = model(ids).last_hidden_state
        by_vectors = model(inputs_embeds=model.embed.tokens(ids)).last_hidden_state
    assert torch.equal(by_ids, by_vectors)

    class Frames(InputEmbeddings):  # (B, T, 80) audio frames -> (B, T, H)
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Linear(80, 32)

        def forward(self, input_ids, position_ids, token_type_ids=None, inputs_embeds=None):
            return self.project(inputs_embeds)

    speech = Transformer(cfg, embeddings=Frames()).eval()
    frames = torch.randn(2, 6, 80)
    assert speech(inputs_embeds=frames).last_hidden_state.shape == (2, 6, 32)
    assert "embed.project.weight" in speech.state_dict()


@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_relative_position_bias_stack_matches_t5_encoder(use_kernels):
    """position="relative": T5's bucketed bias, learned per head, shared by every layer, added to
    unscaled attention scores; with padding, the outputs of transformers' T5 encoder."""
    import transformers as tr

    from graft import kernels
    from graft.nn import Transformer

    torch.manual_seed(0)
    hf = tr.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )  # fmt: skip
    ref = tr.T5EncoderModel(hf).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = TransformerConfig(
        family="t5", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
        position="relative", relative_buckets=8, relative_max_distance=20, norm="rms", norm_eps=1e-6,
        prenorm=True, final_norm=True, activation="relu", qkv_bias=False, out_bias=False, mlp_bias=False,
        attention_scale=1.0, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    state = ref.state_dict()
    names = {
        "embed.tokens.weight": "shared.weight",
        "relative.bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "norm.weight": "encoder.final_layer_norm.weight",
    }
    for i in range(2):
        block = f"encoder.block.{i}.layer"
        for a in "qkvo":
            names[f"layers.{i}.attn.{a}.weight"] = f"{block}.0.SelfAttention.{a}.weight"
        names[f"layers.{i}.attn_norm.weight"] = f"{block}.0.layer_norm.weight"
        names[f"layers.{i}.ffn.up.weight"] = f"{block}.1.DenseReluDense.wi.weight"
        names[f"layers.{i}.ffn.down.weight"] = f"{block}.1.DenseReluDense.wo.weight"
        names[f"layers.{i}.ffn_norm.weight"] = f"{block}.1.layer_norm.weight"
    assert set(names) == set(model.state_dict())
    model.load_state_dict({k: state[v] for k, v in names.items()})
    if use_kernels:
        kernels.optimize(model)
    ids = torch.randint(2, 99, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, mask).last_hidden_state
    real = mask.bool()
    assert expected.abs().max() > 0.1 and (got[real] - expected[real]).abs().max() <= 1e-5
