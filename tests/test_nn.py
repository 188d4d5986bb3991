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
    with pytest.raises(GraftError, match="unknown key 'hiden_size'; did you mean 'hidden_size'\\?"):
        TransformerConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})


# ---- what the next families stand on: two stacks, cross-attention, pluggable embeddings -------


def bart_stacks() -> tuple:
    """A tiny random BART (transformers) and graft's two stacks with its weights: an encoder and
    a causal decoder whose blocks also attend to the encoder's output."""
    import transformers as tr

    from graft.nn import Transformer

    torch.manual_seed(0)
    hf = tr.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
    )  # fmt: skip
    ref = tr.BartModel(hf).eval()
    with torch.no_grad():  # non-trivial biases and norms, so parity means something
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    common = dict(
        family="bart", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
        max_positions=40, embedding_norm=True, norm_eps=1e-5, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    encoder = Transformer(TransformerConfig(**common))
    decoder = Transformer(TransformerConfig(**common, causal=True, cross_attention=True))
    for stack, theirs in ((encoder, ref.encoder), (decoder, ref.decoder)):
        names = {
            "embed.tokens.weight": "embed_tokens.weight",
            "embed.norm.weight": "layernorm_embedding.weight",
            "embed.norm.bias": "layernorm_embedding.bias",
        }
        for i in range(2):
            parts = {"attn": "self_attn", "cross_attn": "encoder_attn"}
            for ours, hf_name in parts.items():
                for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    for t in ("weight", "bias"):
                        names[f"layers.{i}.{ours}.{a}.{t}"] = f"layers.{i}.{hf_name}.{b}.{t}"
            for ours, hf_name in (
                ("attn_norm", "self_attn_layer_norm"),
                ("cross_norm", "encoder_attn_layer_norm"),
                ("ffn.up", "fc1"),
                ("ffn.down", "fc2"),
                ("ffn_norm", "final_layer_norm"),
            ):
                for t in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{t}"] = f"layers.{i}.{hf_name}.{t}"
        state = theirs.state_dict()
        ours = {k: state[v] for k, v in names.items() if v in state}
        ours["embed.positions.weight"] = state["embed_positions.weight"][
            2:
        ]  # BART's table starts at offset 2
        assert set(ours) == set(stack.state_dict())  # every tensor of the stack comes from BART
        stack.load_state_dict(ours)
    return ref, encoder, decoder


@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_an_encoder_decoder_of_two_stacks_matches_bart(use_kernels):
    """Two stacks described by two configs: the decoder's blocks attend to the encoder's output
    (cross-attention, padded encoder tokens masked) and give transformers' BART outputs."""
    from graft import kernels

    ref, encoder, decoder = bart_stacks()
    if use_kernels:
        kernels.optimize(encoder), kernels.optimize(decoder)
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    target = torch.randint(3, 99, (2, 5))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=target)
        memory = encoder(ids, mask).last_hidden_state  # (B, S, H)
        out = decoder(target, context=memory, context_mask=mask, output_attentions=True)
    real = mask.bool()
    assert (memory[real] - expected.encoder_last_hidden_state[real]).abs().max() <= 1e-5
    assert (out.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-5
    cross = out.attentions[1]  # layer 0: self-attention, then cross-attention (B, nh, T, S)
    assert cross.shape == (2, 4, 5, 7) and torch.all(cross[1, :, :, 4:] == 0)


def test_inputs_embeds_and_an_embeddings_module_of_ones_own():
    """Vectors made by another module (patches, audio frames) enter through inputs_embeds and get
    the same positions, norm and dropout; or the stack takes an embeddings module of its own."""
    from torch import nn

    from graft.nn import Transformer

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

    class Frames(nn.Module):  # (B, T, 80) audio frames -> (B, T, H)
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
