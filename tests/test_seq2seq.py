"""Encoder-decoders on graft.nn: one config for two stacks, cross-attention against transformers'
BART and T5, decoding step by step with the cross-attention keys and values computed once."""

from __future__ import annotations

import json

import pytest
import torch

from graft import kernels
from graft.errors import GraftError
from graft.nn import EncoderDecoder, EncoderDecoderConfig, KVCache, TransformerConfig

# ---- two tiny random references and their weights in graft's names (the family modules, with
# their own weight maps, come later; these maps are the test's) ------------------------------


def perturb(ref: torch.nn.Module, which: tuple[str, ...]) -> None:
    """Non-trivial biases and norms, so that parity means something."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if any(w in name for w in which):
                p.add_(torch.randn_like(p) * 0.1)


def bart() -> tuple[torch.nn.Module, EncoderDecoder]:
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
    )  # fmt: skip
    ref = tr.BartModel(hf).eval()
    perturb(ref, ("bias", "norm"))
    stack = dict(
        family="bart", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
        max_positions=40, embedding_norm=True, norm_eps=1e-5, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    cfg = EncoderDecoderConfig(
        encoder=TransformerConfig(**stack),
        decoder=TransformerConfig(**stack, causal=True, cross_attention=True),
        share_embeddings=True,
    )
    names = {}
    for s in ("encoder", "decoder"):
        names |= {
            f"{s}.embed.tokens.weight": "shared.weight",
            f"{s}.embed.positions.weight": f"{s}.embed_positions.weight",
            f"{s}.embed.norm.weight": f"{s}.layernorm_embedding.weight",
            f"{s}.embed.norm.bias": f"{s}.layernorm_embedding.bias",
        }
        for i in range(2):
            parts = {
                "attn": "self_attn",
                "attn_norm": "self_attn_layer_norm",
                "ffn.up": "fc1",
                "ffn.down": "fc2",
            }
            parts |= {"ffn_norm": "final_layer_norm", "cross_attn": "encoder_attn"}
            parts |= {"cross_norm": "encoder_attn_layer_norm"}
            for ours, theirs in parts.items():
                if s == "encoder" and ours.startswith("cross"):
                    continue
                projections = ("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")
                for a, b in projections if ours.endswith("attn") else (("", ""),):
                    for t in ("weight", "bias"):
                        ours_name = ".".join(x for x in (ours, a, t) if x)
                        theirs_name = ".".join(x for x in (theirs, b, t) if x)
                        names[f"{s}.layers.{i}.{ours_name}"] = f"{s}.layers.{i}.{theirs_name}"
    state = ref.state_dict()
    ours = {k: state[v] for k, v in names.items()}
    for s in ("encoder", "decoder"):  # BART's position table starts at offset 2
        ours[f"{s}.embed.positions.weight"] = ours[f"{s}.embed.positions.weight"][2:]
    return ref, load(EncoderDecoder(cfg), ours)


def t5() -> tuple[torch.nn.Module, EncoderDecoder]:
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=20,
    )  # fmt: skip
    ref = tr.T5Model(hf).eval()
    perturb(ref, ("norm",))
    stack = dict(
        family="t5", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
        position="relative", relative_buckets=8, relative_max_distance=20, norm="rms", norm_eps=1e-6,
        prenorm=True, final_norm=True, activation="relu", qkv_bias=False, out_bias=False, mlp_bias=False,
        attention_scale=1.0, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    cfg = EncoderDecoderConfig(
        encoder=TransformerConfig(**stack),
        decoder=TransformerConfig(**stack, causal=True, cross_attention=True),
        share_embeddings=True,
    )
    names = {}
    for s in ("encoder", "decoder"):
        names |= {
            f"{s}.embed.tokens.weight": "shared.weight",
            f"{s}.relative.bias.weight": f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            f"{s}.norm.weight": f"{s}.final_layer_norm.weight",
        }
        for i in range(2):
            layer = f"{s}.block.{i}.layer"
            ffn = 2 if s == "decoder" else 1  # the decoder's cross-attention is its layer 1
            for a in "qkvo":
                names[f"{s}.layers.{i}.attn.{a}.weight"] = f"{layer}.0.SelfAttention.{a}.weight"
                if s == "decoder":
                    names[f"{s}.layers.{i}.cross_attn.{a}.weight"] = f"{layer}.1.EncDecAttention.{a}.weight"
            names[f"{s}.layers.{i}.attn_norm.weight"] = f"{layer}.0.layer_norm.weight"
            if s == "decoder":
                names[f"{s}.layers.{i}.cross_norm.weight"] = f"{layer}.1.layer_norm.weight"
            names[f"{s}.layers.{i}.ffn.up.weight"] = f"{layer}.{ffn}.DenseReluDense.wi.weight"
            names[f"{s}.layers.{i}.ffn.down.weight"] = f"{layer}.{ffn}.DenseReluDense.wo.weight"
            names[f"{s}.layers.{i}.ffn_norm.weight"] = f"{layer}.{ffn}.layer_norm.weight"
    state = ref.state_dict()
    return ref, load(EncoderDecoder(cfg), {k: state[v] for k, v in names.items()})


def load(model: EncoderDecoder, state: dict[str, torch.Tensor]) -> EncoderDecoder:
    assert set(state) == set(model.state_dict())  # every tensor of the model comes from the reference
    model.load_state_dict(state)
    return model.eval()


FAMILIES = {"bart": bart, "t5": t5}
MODES = pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])


def batch() -> tuple[torch.Tensor, ...]:
    """Encoder ids (B, S) with the second row padded, decoder ids (B, T) with the first row padded."""
    torch.manual_seed(1)
    ids, target = torch.randint(3, 99, (2, 7)), torch.randint(3, 99, (2, 5))
    mask, target_mask = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask[1, 4:], target_mask[0, 3:] = 0, 0
    return ids, mask, target, target_mask


# ---- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@MODES
def test_encoder_decoder_matches_transformers(family, use_kernels):
    """Encoder and decoder outputs of transformers' BartModel / T5Model (shared embeddings, padded
    encoder and decoder inputs) at 1e-5 in float32, on every real position."""
    ref, model = FAMILIES[family]()
    if use_kernels:
        kernels.optimize(model)
    ids, mask, target, target_mask = batch()
    with torch.no_grad():
        expected = ref(
            input_ids=ids, attention_mask=mask, decoder_input_ids=target, decoder_attention_mask=target_mask
        )
        got = model(ids, mask, target, target_mask)
    real, real_target = mask.bool(), target_mask.bool()
    assert expected.last_hidden_state.abs().max() > 0.1
    assert (
        got.encoder_last_hidden_state[real] - expected.encoder_last_hidden_state[real]
    ).abs().max() <= 1e-5
    assert (got.last_hidden_state[real_target] - expected.last_hidden_state[real_target]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_attention_probabilities_sum_to_one_over_real_encoder_positions(family):
    ref, model = FAMILIES[family]()
    ids, mask, target, target_mask = batch()
    with torch.no_grad():
        out = model(ids, mask, target, target_mask, output_attentions=True)
        plain = model(ids, mask, target, target_mask)
    assert len(out.cross_attentions) == len(out.decoder_attentions) == len(out.encoder_attentions) == 2
    assert (out.last_hidden_state - plain.last_hidden_state).abs().max() <= 1e-5  # math path, same numbers
    for probs in out.cross_attentions:
        assert probs.shape == (2, 4, 5, 7)  # (B, nh, T, S)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5), atol=1e-6)
        assert torch.all(probs[1, :, :, 4:] == 0) and torch.all(probs[1, :, :, :4] > 0)
    for probs in out.decoder_attentions:
        assert probs.shape == (2, 4, 5, 5) and torch.all(probs.triu(1) == 0)  # causal


# ---- decoding step by step ----------------------------------------------------------------


class CountingCache(KVCache):
    """A KVCache that counts how often cross-attention keys and values are stored."""

    kept = 0

    def keep_cross(self, layer, k, v):
        self.kept += 1
        return super().keep_cross(layer, k, v)


@pytest.mark.parametrize("family", FAMILIES)
@MODES
def test_decoding_step_by_step_equals_the_full_forward(family, use_kernels):
    """With a cache, one decoder position a step gives the full forward's last hidden states at
    every step; the encoder runs once and each layer's cross-attention keys and values are
    projected at the first step only, then read from the cache."""
    ref, model = FAMILIES[family]()
    if use_kernels:
        kernels.optimize(model)
    ids, mask, target, _ = batch()
    calls = {"q": 0, "k": 0, "v": 0}
    for layer in model.decoder.layers:
        for name in calls:
            getattr(layer.cross_attn, name).register_forward_hook(
                lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)
            )
    with torch.no_grad():
        full = model(ids, mask, target).last_hidden_state  # (B, T, H)
        calls.update(q=0, k=0, v=0)
        encoded = model.encode(ids, mask)
        cache = CountingCache(model.config.decoder.num_blocks)
        first = None
        for t in range(target.shape[1]):
            step = model(
                attention_mask=mask,
                decoder_input_ids=target[:, t : t + 1],
                encoder_outputs=encoded,
                cache=cache,
            )
            assert (step.last_hidden_state[:, 0] - full[:, t]).abs().max() <= 1e-5, f"step {t}"
            first = first or list(cache.cross_keys)
            assert all(a is b for a, b in zip(first, cache.cross_keys, strict=True))  # the same tensors
    steps, layers = target.shape[1], len(model.decoder.layers)
    assert cache.kept == layers and cache.length == steps
    assert calls == {"q": steps * layers, "k": layers, "v": layers}


# ---- the config ---------------------------------------------------------------------------


def stacks(**decoder) -> dict:
    base = dict(family="t5", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8)
    return dict(encoder=TransformerConfig(**base), decoder=TransformerConfig(**{**base, **decoder}))


def test_config_round_trips_through_json():
    cfg = EncoderDecoderConfig(**stacks(causal=True, cross_attention=True), share_embeddings=True)
    again = EncoderDecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.decoder.cross_attention and again.share_embeddings


@pytest.mark.parametrize(
    ("decoder", "options", "message"),
    [
        ({"causal": True}, {}, "config: decoder.cross_attention must be true in an encoder-decoder"),
        ({"cross_attention": True}, {}, "config: decoder.causal must be true in an encoder-decoder"),
        (
            {"causal": True, "cross_attention": True, "hidden_size": 48},
            {},
            "config: encoder.hidden_size 32 and decoder.hidden_size 48 differ; set project_context: true",
        ),
        (
            {"causal": True, "cross_attention": True, "vocab_size": 12},
            {"share_embeddings": True},
            r"config: share_embeddings needs one encoder.vocab_size and decoder.vocab_size \(10 and 12\)",
        ),
    ],
)
def test_config_rejects_stacks_that_do_not_fit(decoder, options, message):
    with pytest.raises(GraftError, match=message):
        EncoderDecoderConfig(**stacks(**decoder), **options)


def test_config_from_dict_names_the_stack_and_the_key():
    d = EncoderDecoderConfig(**stacks(causal=True, cross_attention=True)).to_dict()
    with pytest.raises(
        GraftError, match="^config: unknown key 'share_embedding'; did you mean 'share_embeddings'"
    ):
        EncoderDecoderConfig.from_dict({**d, "share_embedding": True})
    with pytest.raises(
        GraftError, match="^config: decoder: unknown key 'hiden_size'; did you mean 'hidden_size'"
    ):
        EncoderDecoderConfig.from_dict({**d, "decoder": {**d["decoder"], "hiden_size": 3}})
    with pytest.raises(GraftError, match="^config: encoder: position='alibi' is not one of"):
        EncoderDecoderConfig.from_dict({**d, "encoder": {**d["encoder"], "position": "alibi"}})
    with pytest.raises(GraftError, match="^config: decoder must be a mapping"):
        EncoderDecoderConfig.from_dict({"encoder": d["encoder"]})


def test_shared_embeddings_are_one_table_and_separate_ones_are_two():
    shared = EncoderDecoder(
        EncoderDecoderConfig(**stacks(causal=True, cross_attention=True), share_embeddings=True)
    )
    separate = EncoderDecoder(EncoderDecoderConfig(**stacks(causal=True, cross_attention=True)))
    assert shared.decoder.embed.tokens.weight is shared.encoder.embed.tokens.weight
    assert separate.decoder.embed.tokens.weight is not separate.encoder.embed.tokens.weight


@MODES
def test_an_audio_encoder_of_another_width_feeds_a_text_decoder(use_kernels):
    """Whisper's shape of model: audio frames into a 24-wide encoder, its output projected to the
    32-wide decoder's cross-attention; gradients reach every weight."""
    encoder = TransformerConfig(
        family="whisper", vocab_size=1, hidden_size=24, num_layers=1, num_heads=4, intermediate_size=16,
        inputs="audio_frames", num_mel_bins=8, position="sinusoidal", max_positions=6, prenorm=True,
        final_norm=True, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    decoder = TransformerConfig(
        family="whisper", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=16,
        max_positions=10, prenorm=True, final_norm=True, causal=True, cross_attention=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(encoder, decoder, project_context=True))
    if use_kernels:
        kernels.optimize(model)
    features = torch.randn(2, 8, 12)  # (B, mel bins, frames): 6 positions after the stride-2 conv
    out = model(input_features=features, decoder_input_ids=torch.randint(0, 50, (2, 4)))
    assert out.encoder_last_hidden_state.shape == (2, 6, 24) and out.last_hidden_state.shape == (2, 4, 32)
    out.last_hidden_state.pow(2).sum().backward()
    assert model.project.weight.grad.abs().sum() > 0
    assert model.encoder.embed.conv1.weight.grad.abs().sum() > 0
