"""T5 (v1.0, v1.1/Flan, mT5): pre-LN encoder-decoders with RMS-style norms, no biases, no
absolute positions but one learned relative position bias per stack (in its first block), and
attention scores that are not scaled. v1.0 has a ReLU feed-forward and a tied output layer (fed
the decoder's output times d_model ** -0.5); v1.1, Flan-T5 and mT5 a gated-GELU feed-forward
and an output layer of their own.
"""

from __future__ import annotations

from typing import Any

from graft.errors import GraftError
from graft.models.registry import (
    ACTIVATIONS_FROM_HF,
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    describe,
    flag,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import EncoderDecoderConfig, TransformerConfig


def feed_forward(hf: dict[str, Any]) -> tuple[str, bool]:
    """config.json's feed_forward_proj ("relu", "gated-gelu", "gated-silu"...) -> (activation, gated)."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj == "gated-gelu":  # transformers reads this one as the tanh approximation (gelu_new)
        return "gelu_tanh", True
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    name = parts[-1] if parts else None
    if not (len(parts) == 1 or gated) or name not in ACTIVATIONS_FROM_HF:
        raise GraftError(
            f"config.json: feed_forward_proj {describe(proj)} is not supported (relu, gelu, gated-gelu, gated-silu...)"
        )
    return ACTIVATIONS_FROM_HF[name], gated


def layer(stack: str, gated: bool) -> dict[str, str]:
    """One block's HF -> graft names ('{}' is the layer): self-attention, (cross-attention), feed-forward."""
    hf, ours = f"{stack}.block.{{}}.layer", f"{stack}.layers.{{}}"
    ffn = 2 if stack == "decoder" else 1  # the decoder's cross-attention is its sub-layer 1
    names = {f"{hf}.0.SelfAttention.{a}.weight": f"{ours}.attn.{a}.weight" for a in "qkvo"}
    names[f"{hf}.0.layer_norm.weight"] = f"{ours}.attn_norm.weight"
    if stack == "decoder":
        names |= {f"{hf}.1.EncDecAttention.{a}.weight": f"{ours}.cross_attn.{a}.weight" for a in "qkvo"}
        names[f"{hf}.1.layer_norm.weight"] = f"{ours}.cross_norm.weight"
    if gated:
        names[f"{hf}.{ffn}.DenseReluDense.wi_0.weight"] = f"{ours}.ffn.gate.weight"
        names[f"{hf}.{ffn}.DenseReluDense.wi_1.weight"] = f"{ours}.ffn.up.weight"
    else:
        names[f"{hf}.{ffn}.DenseReluDense.wi.weight"] = f"{ours}.ffn.up.weight"
    names[f"{hf}.{ffn}.DenseReluDense.wo.weight"] = f"{ours}.ffn.down.weight"
    names[f"{hf}.{ffn}.layer_norm.weight"] = f"{ours}.ffn_norm.weight"
    return names


def config_from_hf(hf: dict[str, Any], family: str = "t5") -> EncoderDecoderConfig:
    activation, gated = feed_forward(hf)
    layers = integer(hf, "num_layers", 6, high=MAX_LAYERS)
    common = dict(
        family=family,
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=integer(hf, "d_model"),
        num_heads=integer(hf, "num_heads"),
        head_dim=integer(hf, "d_kv", 64),
        intermediate_size=integer(hf, "d_ff"),
        position="relative",
        relative_buckets=integer(hf, "relative_attention_num_buckets", 32),
        relative_max_distance=integer(hf, "relative_attention_max_distance", 128),
        norm="rms",
        norm_eps=number(hf, "layer_norm_epsilon", 1e-6, positive=True),
        prenorm=True,
        final_norm=True,
        activation=activation,
        gated=gated,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        attention_scale=1.0,  # T5 folds the 1/sqrt(d) into its initialization
        tie_word_embeddings=flag(hf, "tie_word_embeddings", True),
        dropout=number(hf, "dropout_rate", 0.1, high=1.0),
        attention_dropout=number(hf, "dropout_rate", 0.1, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 0),
        eos_token_id=token_id(hf, "eos_token_id", 1),
        hf_config=hf,
    )
    encoder = TransformerConfig(**common, num_layers=layers)
    decoder = TransformerConfig(
        **common,
        num_layers=integer(hf, "num_decoder_layers", layers, high=MAX_LAYERS),
        causal=True,
        cross_attention=True,
    )
    start = token_id(hf, "decoder_start_token_id", 0)
    flag(
        hf, "scale_decoder_outputs", True
    )  # read by the seq2seq head; checked here, where errors name the file
    return EncoderDecoderConfig(encoder, decoder, share_embeddings=True, decoder_start_token_id=start)


def config_to_hf(cfg: EncoderDecoderConfig) -> dict[str, Any]:
    enc, dec = cfg.encoder, cfg.decoder
    if dec.gated:
        proj = "gated-gelu" if dec.activation == "gelu_tanh" else f"gated-{ACTIVATIONS_TO_HF[dec.activation]}"
    else:
        proj = ACTIVATIONS_TO_HF[dec.activation]
    return {
        "model_type": dec.family,
        "vocab_size": dec.vocab_size,
        "d_model": dec.hidden_size,
        "d_kv": dec.head_dim,
        "d_ff": dec.intermediate_size,
        "num_layers": enc.num_layers,
        "num_decoder_layers": dec.num_layers,
        "num_heads": dec.num_heads,
        "relative_attention_num_buckets": dec.relative_buckets,
        "relative_attention_max_distance": dec.relative_max_distance,
        "layer_norm_epsilon": dec.norm_eps,
        "feed_forward_proj": proj,
        "tie_word_embeddings": dec.tie_word_embeddings,
        "dropout_rate": dec.dropout,
        "pad_token_id": dec.pad_token_id,
        "eos_token_id": dec.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "is_encoder_decoder": True,
    }


def weight_map(cfg: EncoderDecoderConfig) -> WeightMap:
    # "shared" is the token table of both stacks (graft: encoder.embed.tokens, the decoder's the same
    # Parameter); the stacks' own embed_tokens names are copies that older checkpoints saved
    names = pair("shared", "encoder.embed.tokens", bias=False)
    for stack, stack_cfg in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        names[bias] = f"{stack}.relative.bias.weight"  # one per stack, kept by its first block
        names |= per_layer(layer(stack, stack_cfg.gated), stack_cfg.num_layers)
        names[f"{stack}.final_layer_norm.weight"] = f"{stack}.norm.weight"
    return WeightMap(names, ignored=("embed_tokens.weight",))


T5 = register(
    Family(
        name="t5",
        model_types=("t5",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "T5Model", "seq2seq": "T5ForConditionalGeneration"},
        encoder_decoder=True,
    )
)

# mT5: T5 v1.1's architecture over a 250k multilingual vocabulary; transformers' classes of its own
MT5 = register(
    Family(
        name="mt5",
        model_types=("mt5",),
        config_from_hf=lambda hf: config_from_hf(hf, "mt5"),
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "MT5Model", "seq2seq": "MT5ForConditionalGeneration"},
        encoder_decoder=True,
    )
)
