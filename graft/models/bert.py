"""BERT and RoBERTa (XLM-R too): post-LN encoders with learned positions and segment embeddings."""

from __future__ import annotations

from typing import Any

from graft.errors import GraftError
from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    activation_from_hf,
    describe,
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import TransformerConfig

LAYER = {
    **pair("encoder.layer.{}.attention.self.query", "layers.{}.attn.q"),
    **pair("encoder.layer.{}.attention.self.key", "layers.{}.attn.k"),
    **pair("encoder.layer.{}.attention.self.value", "layers.{}.attn.v"),
    **pair("encoder.layer.{}.attention.output.dense", "layers.{}.attn.o"),
    **pair("encoder.layer.{}.attention.output.LayerNorm", "layers.{}.attn_norm"),
    **pair("encoder.layer.{}.intermediate.dense", "layers.{}.ffn.up"),
    **pair("encoder.layer.{}.output.dense", "layers.{}.ffn.down"),
    **pair("encoder.layer.{}.output.LayerNorm", "layers.{}.ffn_norm"),
}


def config_from_hf(hf: dict[str, Any], family: str = "bert") -> TransformerConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise GraftError(
            f"config.json: position_embedding_type {describe(hf['position_embedding_type'])} is not supported"
        )
    roberta = family == "roberta"
    hidden, n_heads = heads(hf, "hidden_size", "num_attention_heads")
    return TransformerConfig(
        family=family,
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "intermediate_size"),
        max_positions=integer(hf, "max_position_embeddings", 512),
        type_vocab_size=integer(hf, "type_vocab_size", 2, low=0),
        positions_from_padding=roberta,
        embedding_norm=True,
        norm_eps=number(hf, "layer_norm_eps", 1e-12),
        activation=activation_from_hf(hf.get("hidden_act", "gelu")),
        pooler=True,
        dropout=number(hf, "hidden_dropout_prob", 0.1, high=1.0),
        attention_dropout=number(hf, "attention_probs_dropout_prob", 0.1, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 1 if roberta else 0),
        bos_token_id=token_id(hf, "bos_token_id"),
        eos_token_id=token_id(hf, "eos_token_id"),
        hf_config=hf,
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "model_type": cfg.hf_config.get("model_type", cfg.family),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
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


def weight_map(cfg: TransformerConfig, prefix: str = "bert.") -> WeightMap:
    names = {
        **pair("embeddings.word_embeddings", "embed.tokens", bias=False),
        **pair("embeddings.position_embeddings", "embed.positions", bias=False),
        **pair("embeddings.LayerNorm", "embed.norm"),
        **per_layer(LAYER, cfg.num_layers),
    }
    if cfg.type_vocab_size:
        names.update(pair("embeddings.token_type_embeddings", "embed.token_types", bias=False))
    if cfg.pooler:
        names.update(pair("pooler.dense", "pooler"))
    return WeightMap(names, ignored=("position_ids", "token_type_ids"), prefix=prefix)


BERT = register(
    Family(
        name="bert",
        model_types=("bert",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={
            "base": "BertModel",
            "classification": "BertForSequenceClassification",
            "token-classification": "BertForTokenClassification",
            "question-answering": "BertForQuestionAnswering",
            "masked-lm": "BertForMaskedLM",
        },
    )
)

ROBERTA = register(
    Family(
        name="roberta",
        model_types=("roberta", "xlm-roberta"),
        config_from_hf=lambda hf: config_from_hf(hf, "roberta"),
        config_to_hf=config_to_hf,
        weight_map=lambda cfg: weight_map(cfg, prefix="roberta."),
        architectures={
            "base": "RobertaModel",
            "classification": "RobertaForSequenceClassification",
            "token-classification": "RobertaForTokenClassification",
            "question-answering": "RobertaForQuestionAnswering",
            "masked-lm": "RobertaForMaskedLM",
        },
    )
)
