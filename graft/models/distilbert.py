"""DistilBERT: a 6-layer BERT distilled from BERT-base; no segment embeddings, no pooler."""

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
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import TransformerConfig

LAYER = {
    **pair("transformer.layer.{}.attention.q_lin", "layers.{}.attn.q"),
    **pair("transformer.layer.{}.attention.k_lin", "layers.{}.attn.k"),
    **pair("transformer.layer.{}.attention.v_lin", "layers.{}.attn.v"),
    **pair("transformer.layer.{}.attention.out_lin", "layers.{}.attn.o"),
    **pair("transformer.layer.{}.sa_layer_norm", "layers.{}.attn_norm"),
    **pair("transformer.layer.{}.ffn.lin1", "layers.{}.ffn.up"),
    **pair("transformer.layer.{}.ffn.lin2", "layers.{}.ffn.down"),
    **pair("transformer.layer.{}.output_layer_norm", "layers.{}.ffn_norm"),
}


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    # With sinusoidal_pos_embds the table is still stored as a weight, so it loads as "learned".
    hidden, n_heads = heads(hf, "dim", "n_heads")
    return TransformerConfig(
        family="distilbert",
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=integer(hf, "n_layers", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "hidden_dim"),
        max_positions=integer(hf, "max_position_embeddings", 512),
        embedding_norm=True,
        norm_eps=1e-12,
        activation=activation_from_hf(hf.get("activation", "gelu")),
        dropout=number(hf, "dropout", 0.1, high=1.0),
        attention_dropout=number(hf, "attention_dropout", 0.1, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 0),
        hf_config=hf,
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "model_type": "distilbert",
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "hidden_dim": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_positions,
        "activation": ACTIVATIONS_TO_HF[cfg.activation],
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
    }


def weight_map(cfg: TransformerConfig) -> WeightMap:
    names = {
        **pair("embeddings.word_embeddings", "embed.tokens", bias=False),
        **pair("embeddings.position_embeddings", "embed.positions", bias=False),
        **pair("embeddings.LayerNorm", "embed.norm"),
        **per_layer(LAYER, cfg.num_layers),
    }
    return WeightMap(names, ignored=("position_ids",), prefix="distilbert.")


DISTILBERT = register(
    Family(
        name="distilbert",
        model_types=("distilbert",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={
            "base": "DistilBertModel",
            "classification": "DistilBertForSequenceClassification",
            "token-classification": "DistilBertForTokenClassification",
            "question-answering": "DistilBertForQuestionAnswering",
            "masked-lm": "DistilBertForMaskedLM",
        },
    )
)
