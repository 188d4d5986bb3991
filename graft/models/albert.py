"""ALBERT: BERT with factorized embeddings and blocks shared across layers."""

from __future__ import annotations

from typing import Any

from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    activation_from_hf,
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair
from graft.nn.config import TransformerConfig

LAYER = {
    **pair("attention.query", "attn.q"),
    **pair("attention.key", "attn.k"),
    **pair("attention.value", "attn.v"),
    **pair("attention.dense", "attn.o"),
    **pair("attention.LayerNorm", "attn_norm"),
    **pair("ffn", "ffn.up"),
    **pair("ffn_output", "ffn.down"),
    **pair("full_layer_layer_norm", "ffn_norm"),
}


def layer_order(num_layers: int, groups: int, inner: int) -> list[int]:
    """Which unique block runs at each depth: layer i uses group int(i / (L / G)), all its inner layers."""
    return [int(i / (num_layers / groups)) * inner + j for i in range(num_layers) for j in range(inner)]


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    layers = integer(hf, "num_hidden_layers", high=MAX_LAYERS)
    groups = integer(hf, "num_hidden_groups", 1, high=layers)
    inner = integer(hf, "inner_group_num", 1, high=MAX_LAYERS // layers)
    order = layer_order(layers, groups, inner)
    hidden, n_heads = heads(hf, "hidden_size", "num_attention_heads")
    return TransformerConfig(
        family="albert",
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=len(order),
        num_heads=n_heads,
        intermediate_size=integer(hf, "intermediate_size"),
        max_positions=integer(hf, "max_position_embeddings", 512),
        embedding_size=integer(hf, "embedding_size", 128),
        type_vocab_size=integer(hf, "type_vocab_size", 2, low=0),
        embedding_norm=True,
        norm_eps=number(hf, "layer_norm_eps", 1e-12),
        activation=activation_from_hf(hf.get("hidden_act", "gelu_new")),
        layer_order=order,
        pooler=True,
        dropout=number(hf, "hidden_dropout_prob", 0.0, high=1.0),
        attention_dropout=number(hf, "attention_probs_dropout_prob", 0.0, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 0),
        bos_token_id=token_id(hf, "bos_token_id"),
        eos_token_id=token_id(hf, "eos_token_id"),
        hf_config=hf,
    )


def groups(cfg: TransformerConfig) -> tuple[int, int, int]:
    """(num_hidden_layers, num_hidden_groups, inner_group_num) as HF counts them."""
    hf = cfg.hf_config
    inner = hf.get("inner_group_num", 1)
    return cfg.num_layers // inner, hf.get("num_hidden_groups", cfg.num_blocks // inner), inner


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    layers, num_groups, inner = groups(cfg)
    return {
        "model_type": "albert",
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": layers,
        "num_hidden_groups": num_groups,
        "inner_group_num": inner,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "position_embedding_type": "absolute",
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def weight_map(cfg: TransformerConfig) -> WeightMap:
    _, num_groups, inner = groups(cfg)
    names = {
        **pair("embeddings.word_embeddings", "embed.tokens", bias=False),
        **pair("embeddings.position_embeddings", "embed.positions", bias=False),
        **pair("embeddings.token_type_embeddings", "embed.token_types", bias=False),
        **pair("embeddings.LayerNorm", "embed.norm"),
        **pair("encoder.embedding_hidden_mapping_in", "embed.project"),
    }
    for g in range(num_groups):
        for j in range(inner):
            for hf, graft in LAYER.items():
                names[f"encoder.albert_layer_groups.{g}.albert_layers.{j}.{hf}"] = (
                    f"layers.{g * inner + j}.{graft}"
                )
    if cfg.pooler:
        names.update(pair("pooler", "pooler"))
    return WeightMap(names, ignored=("position_ids", "token_type_ids"), prefix="albert.")


ALBERT = register(
    Family(
        name="albert",
        model_types=("albert",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={
            "base": "AlbertModel",
            "classification": "AlbertForSequenceClassification",
            "token-classification": "AlbertForTokenClassification",
            "question-answering": "AlbertForQuestionAnswering",
            "masked-lm": "AlbertForMaskedLM",
        },
    )
)
