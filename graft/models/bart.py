"""BART and mBART: encoder-decoders with learned positions offset by 2 and one shared token table.

BART is post-LN with a norm on the embeddings; mBART is pre-LN, with a final norm on each stack
too, and scales its token embeddings by sqrt(d_model) (``scale_embedding``).
"""

from __future__ import annotations

from typing import Any

from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    activation_from_hf,
    flag,
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import EncoderDecoderConfig, TransformerConfig

OFFSET = 2  # BART's learned position table keeps two rows before position 0

ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def layer(stack: str, cross: bool) -> dict[str, str]:
    """One block's HF -> graft names ('{}' is the layer)."""
    hf, ours = f"{stack}.layers.{{}}", f"{stack}.layers.{{}}"
    names = {}
    for graft_name, hf_name in ATTENTION.items():
        names |= pair(f"{hf}.self_attn.{hf_name}", f"{ours}.attn.{graft_name}")
        if cross:
            names |= pair(f"{hf}.encoder_attn.{hf_name}", f"{ours}.cross_attn.{graft_name}")
    names |= pair(f"{hf}.self_attn_layer_norm", f"{ours}.attn_norm")
    if cross:
        names |= pair(f"{hf}.encoder_attn_layer_norm", f"{ours}.cross_norm")
    names |= pair(f"{hf}.fc1", f"{ours}.ffn.up") | pair(f"{hf}.fc2", f"{ours}.ffn.down")
    return names | pair(f"{hf}.final_layer_norm", f"{ours}.ffn_norm")


def config_from_hf(hf: dict[str, Any], family: str = "bart") -> EncoderDecoderConfig:
    mbart = family == "mbart"
    hidden, enc_heads = heads(hf, "d_model", "encoder_attention_heads")
    _, dec_heads = heads(hf, "d_model", "decoder_attention_heads")
    common = dict(
        family=family,
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        max_positions=integer(hf, "max_position_embeddings", 1024) + OFFSET,
        position_offset=OFFSET,
        scale_embeddings=flag(hf, "scale_embedding", False),
        embedding_norm=True,
        norm_eps=1e-5,  # transformers' BART keeps nn.LayerNorm's default
        prenorm=mbart,
        final_norm=mbart,
        activation=activation_from_hf(hf.get("activation_function", "gelu")),
        tie_word_embeddings=flag(hf, "tie_word_embeddings", True),
        dropout=number(hf, "dropout", 0.1, high=1.0),
        attention_dropout=number(hf, "attention_dropout", 0.0, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 1),
        bos_token_id=token_id(hf, "bos_token_id", 0),
        eos_token_id=token_id(hf, "eos_token_id", 2),
        hf_config=hf,
    )
    encoder = TransformerConfig(
        **common,
        num_layers=integer(hf, "encoder_layers", 12, high=MAX_LAYERS),
        num_heads=enc_heads,
        intermediate_size=integer(hf, "encoder_ffn_dim", 4096),
    )
    decoder = TransformerConfig(
        **common,
        num_layers=integer(hf, "decoder_layers", 12, high=MAX_LAYERS),
        num_heads=dec_heads,
        intermediate_size=integer(hf, "decoder_ffn_dim", 4096),
        causal=True,
        cross_attention=True,
    )
    return EncoderDecoderConfig(
        encoder,
        decoder,
        share_embeddings=True,
        decoder_start_token_id=token_id(hf, "decoder_start_token_id", 2),
    )


def config_to_hf(cfg: EncoderDecoderConfig) -> dict[str, Any]:
    enc, dec = cfg.encoder, cfg.decoder
    return {
        "model_type": dec.family,
        "vocab_size": dec.vocab_size,
        "d_model": dec.hidden_size,
        "encoder_layers": enc.num_layers,
        "decoder_layers": dec.num_layers,
        "encoder_attention_heads": enc.num_heads,
        "decoder_attention_heads": dec.num_heads,
        "encoder_ffn_dim": enc.intermediate_size,
        "decoder_ffn_dim": dec.intermediate_size,
        "max_position_embeddings": dec.max_positions - OFFSET,
        "scale_embedding": dec.scale_embeddings,
        "activation_function": ACTIVATIONS_TO_HF[dec.activation],
        "tie_word_embeddings": dec.tie_word_embeddings,
        "dropout": dec.dropout,
        "attention_dropout": dec.attention_dropout,
        "pad_token_id": dec.pad_token_id,
        "bos_token_id": dec.bos_token_id,
        "eos_token_id": dec.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "is_encoder_decoder": True,
    }


def weight_map(cfg: EncoderDecoderConfig) -> WeightMap:
    # the shared table is "shared" in HF and encoder.embed.tokens in graft (the decoder's is the same
    # Parameter); the HF stacks' own embed_tokens names are copies of it that old checkpoints saved
    names = pair("shared", "encoder.embed.tokens", bias=False)
    for stack, stack_cfg in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        names |= pair(f"{stack}.embed_positions", f"{stack}.embed.positions", bias=False)
        names |= pair(f"{stack}.layernorm_embedding", f"{stack}.embed.norm")
        names |= per_layer(layer(stack, cross=stack == "decoder"), stack_cfg.num_layers)
        if stack_cfg.final_norm:
            names |= pair(f"{stack}.layer_norm", f"{stack}.norm")
    return WeightMap(names, ignored=("embed_tokens.weight",), prefix="model.")


ARCHITECTURES = {"base": "BartModel", "seq2seq": "BartForConditionalGeneration"}

BART = register(
    Family(
        name="bart",
        model_types=("bart",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures=ARCHITECTURES,
        encoder_decoder=True,
    )
)

MBART = register(
    Family(
        name="mbart",
        model_types=("mbart",),
        config_from_hf=lambda hf: config_from_hf(hf, "mbart"),
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "MBartModel", "seq2seq": "MBartForConditionalGeneration"},
        encoder_decoder=True,
    )
)
