"""GPT-2: a pre-LN causal decoder with learned positions, Conv1D weights and a tied LM head."""

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
from graft.nn.config import TransformerConfig

LAYER = {
    **pair("h.{}.ln_1", "layers.{}.attn_norm"),
    # c_attn holds Q, K and V side by side.
    "h.{}.attn.c_attn.weight": (
        "layers.{}.attn.q.weight",
        "layers.{}.attn.k.weight",
        "layers.{}.attn.v.weight",
    ),
    "h.{}.attn.c_attn.bias": ("layers.{}.attn.q.bias", "layers.{}.attn.k.bias", "layers.{}.attn.v.bias"),
    **pair("h.{}.attn.c_proj", "layers.{}.attn.o"),
    **pair("h.{}.ln_2", "layers.{}.ffn_norm"),
    **pair("h.{}.mlp.c_fc", "layers.{}.ffn.up"),
    **pair("h.{}.mlp.c_proj", "layers.{}.ffn.down"),
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    hidden, n_heads = heads(hf, "n_embd", "n_head")
    return TransformerConfig(
        family="gpt2",
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=integer(hf, "n_layer", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "n_inner", 4 * hidden),
        max_positions=integer(hf, "n_positions", 1024),
        norm_eps=number(hf, "layer_norm_epsilon", 1e-5),
        prenorm=True,
        final_norm=True,
        activation=activation_from_hf(hf.get("activation_function", "gelu_new")),
        causal=True,
        attention_scale=None if flag(hf, "scale_attn_weights", True) else 1.0,
        scale_by_inverse_layer=flag(hf, "scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=flag(hf, "tie_word_embeddings", True),
        dropout=number(hf, "resid_pdrop", 0.1, high=1.0),
        attention_dropout=number(hf, "attn_pdrop", 0.1, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id"),
        bos_token_id=token_id(hf, "bos_token_id", 50256),
        eos_token_id=token_id(hf, "eos_token_id", 50256),
        hf_config=hf,
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.intermediate_size,
        "n_positions": cfg.max_positions,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": ACTIVATIONS_TO_HF[cfg.activation],
        "scale_attn_weights": cfg.attention_scale is None,
        "scale_attn_by_inverse_layer_idx": cfg.scale_by_inverse_layer,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def weight_map(cfg: TransformerConfig) -> WeightMap:
    names = {
        **pair("wte", "embed.tokens", bias=False),
        **pair("wpe", "embed.positions", bias=False),
        **per_layer(LAYER, cfg.num_layers),
        **pair("ln_f", "norm"),
    }
    transposed = frozenset(n for n in names if n.endswith(CONV1D))
    # attn.bias / attn.masked_bias: causal-mask buffers that old checkpoints saved.
    return WeightMap(
        names, transposed=transposed, ignored=("attn.bias", "attn.masked_bias"), prefix="transformer."
    )


GPT2 = register(
    Family(
        name="gpt2",
        model_types=("gpt2",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={
            "base": "GPT2Model",
            "causal-lm": "GPT2LMHeadModel",
            "classification": "GPT2ForSequenceClassification",
            "token-classification": "GPT2ForTokenClassification",
            "question-answering": "GPT2ForQuestionAnswering",
        },
        decoder=True,
    )
)
