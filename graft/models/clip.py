"""CLIP: a causal text tower and a pre-LN ViT, each projected into one space (a ``DualEncoder``).

The text tower is GPT-like (causal mask, learned positions, pre-LN, final norm, quick GELU) and is
read at its end-of-text token; the image tower is ViT with a LayerNorm before the blocks
(``pre_layrnorm``, graft's embedding norm), no patch bias, and a LayerNorm on [CLS] after them
(``post_layernorm``, graft's final norm: the same on the one row read). config.json nests the
towers' keys under ``text_config`` and ``vision_config``, with transformers' defaults for the
keys a checkpoint leaves out.
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
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.vit import square
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import TransformerConfig
from graft.nn.dual_encoder import DualEncoderConfig

LAYER = {
    **pair("encoder.layers.{}.self_attn.q_proj", "layers.{}.attn.q"),
    **pair("encoder.layers.{}.self_attn.k_proj", "layers.{}.attn.k"),
    **pair("encoder.layers.{}.self_attn.v_proj", "layers.{}.attn.v"),
    **pair("encoder.layers.{}.self_attn.out_proj", "layers.{}.attn.o"),
    **pair("encoder.layers.{}.layer_norm1", "layers.{}.attn_norm"),
    **pair("encoder.layers.{}.mlp.fc1", "layers.{}.ffn.up"),
    **pair("encoder.layers.{}.mlp.fc2", "layers.{}.ffn.down"),
    **pair("encoder.layers.{}.layer_norm2", "layers.{}.ffn_norm"),
}
# transformers' defaults for keys a config.json leaves out (CLIPTextConfig, CLIPVisionConfig)
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "eos_token_id": 49407}  # fmt: skip
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 224, "patch_size": 32}  # fmt: skip


def tower(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """One tower's keys: ``text_config`` (older checkpoints: ``text_config_dict`` wins) over the defaults."""
    values = [hf.get(key), hf.get(f"{key}_dict")]
    for value in values:
        if value is not None and not isinstance(value, dict):
            raise GraftError(
                f"config.json: {key} must be a mapping of the tower's keys, found {describe(value)}"
            )
    return {**defaults, **(values[0] or {}), **(values[1] or {})}


def common(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """What both towers' configs read alike: pre-LN blocks, quick GELU, no dropout but attention's."""
    hidden, n_heads = heads(hf, "hidden_size", "num_attention_heads")
    return dict(
        family=family,
        hidden_size=hidden,
        num_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "intermediate_size"),
        norm_eps=number(hf, "layer_norm_eps", 1e-5),
        prenorm=True,
        final_norm=True,
        activation=activation_from_hf(hf.get("hidden_act", "quick_gelu")),
        tie_word_embeddings=False,
        dropout=0.0,
        attention_dropout=number(hf, "attention_dropout", 0.0, high=1.0),
        hf_config=hf,
    )


def in_tower(key: str, read: Any, *args: Any) -> Any:
    """``read(*args)``, its message naming the tower: "config.json: text_config.hidden_size ..."."""
    try:
        return read(*args)
    except GraftError as e:
        where, _, what = str(e).partition(": ")
        raise GraftError(f"{where}: {key}.{what}") from None


def text_config(hf: dict[str, Any], family: str = "clip") -> TransformerConfig:
    return TransformerConfig(
        **common(hf, family),
        vocab_size=integer(hf, "vocab_size"),
        max_positions=integer(hf, "max_position_embeddings", high=1 << 20),
        causal=True,
        pad_token_id=token_id(hf, "pad_token_id"),
        bos_token_id=token_id(hf, "bos_token_id"),
        eos_token_id=token_id(hf, "eos_token_id"),
    )


def vision_config(hf: dict[str, Any], family: str = "clip") -> TransformerConfig:
    image, patch = square(hf, "image_size", 224), square(hf, "patch_size", 32)
    if patch > image:
        raise GraftError(f"config.json: patch_size {patch} is larger than image_size {image}")
    return TransformerConfig(
        **common(hf, family),
        vocab_size=0,  # patches, not tokens
        max_positions=(image // patch) ** 2 + 1,
        inputs="patches",
        image_size=image,
        patch_size=patch,
        num_channels=integer(hf, "num_channels", 3),
        patch_bias=False,
        embedding_norm=True,  # pre_layrnorm
    )


def config_from_hf(hf: dict[str, Any]) -> DualEncoderConfig:
    text = in_tower("text_config", text_config, tower(hf, "text_config", TEXT_DEFAULTS))
    vision = in_tower("vision_config", vision_config, tower(hf, "vision_config", VISION_DEFAULTS))
    eos = text.eos_token_id
    if isinstance(eos, list):  # several end ids: the text ends at the first of them
        eos = eos[0] if eos else None
    return DualEncoderConfig(
        family="clip",
        text=text,
        vision=vision,
        projection_dim=integer(hf, "projection_dim", 512),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
        eos_token_id=eos,
        hf_config=hf,
    )


def tower_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "attention_dropout": cfg.attention_dropout,
    }


def check_towers(cfg: DualEncoderConfig) -> None:
    """CLIP's layout holds CLIP's towers only (not a sentence encoder put in as the text tower)."""
    text, vision = cfg.text, cfg.vision
    if cfg.text_pooling != "eos" or text.family != "clip" or vision.family != "clip":
        raise GraftError(
            f"CLIP's layout holds CLIP's towers only, not {text.family} (pooled by {cfg.text_pooling}) and "
            f"{vision.family}: transformers' CLIPModel cannot load them (save the state dict with torch instead)"
        )


def config_to_hf(cfg: DualEncoderConfig) -> dict[str, Any]:
    check_towers(cfg)
    text, vision = cfg.text, cfg.vision
    saved = {k: cfg.hf_config.get(k) or {} for k in ("text_config", "vision_config")}
    return {
        "model_type": "clip",
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "text_config": {
            **saved["text_config"],
            **tower_to_hf(text),
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_positions,
            "pad_token_id": text.pad_token_id,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "projection_dim": cfg.projection_dim,
        },
        "vision_config": {
            **saved["vision_config"],
            **tower_to_hf(vision),
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": vision.num_channels,
            "projection_dim": cfg.projection_dim,
        },
    }


def tower_names(cfg: TransformerConfig, into: str = "") -> dict[str, str]:
    """One tower's HF names (as CLIPTextModel / CLIPVisionModel hold them: text_model.*,
    vision_model.*) -> graft names under ``into`` ("text." in a DualEncoder, "" in the tower alone)."""
    if cfg.inputs == "patches":
        at = "vision_model."
        names = {
            "embeddings.class_embedding": "embed.cls",
            "embeddings.patch_embedding.weight": "embed.patches.weight",
            "embeddings.position_embedding.weight": "embed.positions.weight",
            **pair("pre_layrnorm", "embed.norm"),
            **per_layer(LAYER, cfg.num_layers),
            **pair("post_layernorm", "norm"),
        }
    else:
        at = "text_model."
        names = {
            "embeddings.token_embedding.weight": "embed.tokens.weight",
            "embeddings.position_embedding.weight": "embed.positions.weight",
            **per_layer(LAYER, cfg.num_layers),
            **pair("final_layer_norm", "norm"),
        }
    return {at + hf: into + graft for hf, graft in names.items()}


def weight_map(cfg: DualEncoderConfig | TransformerConfig) -> WeightMap:
    """The whole CLIPModel's names; for one CLIP tower (in a dual encoder whose other tower is of
    another family), that tower's own."""
    if isinstance(cfg, TransformerConfig):
        return WeightMap(tower_names(cfg), ignored=("position_ids",))
    check_towers(cfg)
    names = {
        **tower_names(cfg.text, "text."),
        **tower_names(cfg.vision, "vision."),
        "text_projection.weight": "text_projection.weight",
        "visual_projection.weight": "visual_projection.weight",
        "logit_scale": "logit_scale",
    }
    return WeightMap(names, ignored=("position_ids",))  # older checkpoints saved the position buffers


CLIP = register(
    Family(
        name="clip",
        model_types=("clip",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "CLIPModel"},
        inputs="image-text",
        dual_encoder=True,
    )
)
