"""ViT and DeiT: pre-LN encoders over image patches, a learned [CLS] token and learned positions.

DeiT is ViT with a second learned token after [CLS] (the distillation token), which its
teacher-distilled classifier reads beside [CLS]; otherwise the same weights under another prefix.
"""

from __future__ import annotations

from typing import Any

from graft.errors import GraftError
from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    activation_from_hf,
    describe,
    flag,
    heads,
    integer,
    number,
    register,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import TransformerConfig

LAYER = {
    **pair("encoder.layer.{}.attention.attention.query", "layers.{}.attn.q"),
    **pair("encoder.layer.{}.attention.attention.key", "layers.{}.attn.k"),
    **pair("encoder.layer.{}.attention.attention.value", "layers.{}.attn.v"),
    **pair("encoder.layer.{}.attention.output.dense", "layers.{}.attn.o"),
    **pair("encoder.layer.{}.layernorm_before", "layers.{}.attn_norm"),
    **pair("encoder.layer.{}.intermediate.dense", "layers.{}.ffn.up"),
    **pair("encoder.layer.{}.output.dense", "layers.{}.ffn.down"),
    **pair("encoder.layer.{}.layernorm_after", "layers.{}.ffn_norm"),
}


def square(hf: dict[str, Any], key: str, default: int) -> int:
    """image_size / patch_size: an int, or a [height, width] pair of equal sides."""
    value = hf.get(key, default)
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return integer({key: value}, key, default)


def config_from_hf(hf: dict[str, Any], family: str = "vit") -> TransformerConfig:
    hidden, n_heads = heads(hf, "hidden_size", "num_attention_heads")
    image, patch = square(hf, "image_size", 224), square(hf, "patch_size", 16)
    if patch > image:
        raise GraftError(f"config.json: patch_size {patch} is larger than image_size {image}")
    if hf.get("pooler_act", "tanh") != "tanh" or hf.get("pooler_output_size", hidden) != hidden:
        raise GraftError(
            f"config.json: pooler_act {describe(hf.get('pooler_act'))} / pooler_output_size "
            f"{describe(hf.get('pooler_output_size'))} are not supported (tanh, hidden_size)"
        )
    distilled = family == "deit"
    return TransformerConfig(
        family=family,
        vocab_size=0,  # patches, not tokens
        hidden_size=hidden,
        num_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "intermediate_size"),
        max_positions=(image // patch) ** 2 + 1 + distilled,
        inputs="patches",
        image_size=image,
        patch_size=patch,
        num_channels=integer(hf, "num_channels", 3),
        distillation_token=distilled,
        norm_eps=number(hf, "layer_norm_eps", 1e-12),
        prenorm=True,
        final_norm=True,
        activation=activation_from_hf(hf.get("hidden_act", "gelu")),
        qkv_bias=flag(hf, "qkv_bias", True),
        pooler=True,
        tie_word_embeddings=False,
        dropout=number(hf, "hidden_dropout_prob", 0.0, high=1.0),
        attention_dropout=number(hf, "attention_probs_dropout_prob", 0.0, high=1.0),
        hf_config=hf,
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "model_type": cfg.family,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "qkv_bias": cfg.qkv_bias,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
    }


def weight_map(cfg: TransformerConfig, prefix: str = "vit.") -> WeightMap:
    names: dict[str, Any] = {
        "embeddings.cls_token": "embed.cls",  # (1, 1, H) in HF, (H,) here
        "embeddings.position_embeddings": "embed.positions.weight",  # (1, N + 1, H) in HF
        **pair("embeddings.patch_embeddings.projection", "embed.patches"),
        **per_layer(LAYER, cfg.num_layers),
        **pair("layernorm", "norm"),
    }
    unsqueezed = {"embeddings.cls_token": 2, "embeddings.position_embeddings": 1}
    if cfg.distillation_token:
        names["embeddings.distillation_token"] = "embed.distillation"
        unsqueezed["embeddings.distillation_token"] = 2
    if cfg.pooler:
        names.update(pair("pooler.dense", "pooler"))
    return WeightMap(names, prefix=prefix, unsqueezed=unsqueezed)


VIT = register(
    Family(
        name="vit",
        model_types=("vit",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "ViTModel", "image-classification": "ViTForImageClassification"},
        inputs="patches",
    )
)

DEIT = register(
    Family(
        name="deit",
        model_types=("deit",),
        config_from_hf=lambda hf: config_from_hf(hf, "deit"),
        config_to_hf=config_to_hf,
        weight_map=lambda cfg: weight_map(cfg, prefix="deit."),
        architectures={"base": "DeiTModel", "image-classification": "DeiTForImageClassification"},
        inputs="patches",
    )
)
