"""Llama and its kin: pre-RMSNorm causal decoders with rotary positions, SwiGLU and grouped-query attention.

SmolLM and TinyLlama are Llama checkpoints (model_type "llama"). Qwen2 and Mistral differ only in
settings: Qwen2 puts a bias on the Q/K/V projections, Mistral attends within a sliding window.
"""

from __future__ import annotations

from typing import Any

from graft.errors import GraftError
from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    REQUIRED,
    Family,
    activation_from_hf,
    describe,
    flag,
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import TransformerConfig

ROPE_TYPES = ("default", "linear", "llama3")  # what graft.nn.positions implements


def layer(qkv_bias: bool, out_bias: bool, mlp_bias: bool) -> dict[str, str]:
    p = "layers.{}."
    return {
        **pair(p + "input_layernorm", p + "attn_norm", bias=False),
        **pair(p + "self_attn.q_proj", p + "attn.q", bias=qkv_bias),
        **pair(p + "self_attn.k_proj", p + "attn.k", bias=qkv_bias),
        **pair(p + "self_attn.v_proj", p + "attn.v", bias=qkv_bias),
        **pair(p + "self_attn.o_proj", p + "attn.o", bias=out_bias),
        **pair(p + "post_attention_layernorm", p + "ffn_norm", bias=False),
        **pair(p + "mlp.gate_proj", p + "ffn.gate", bias=mlp_bias),
        **pair(p + "mlp.up_proj", p + "ffn.up", bias=mlp_bias),
        **pair(p + "mlp.down_proj", p + "ffn.down", bias=mlp_bias),
    }


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from the legacy keys (rope_theta, rope_scaling) or transformers 5's rope_parameters.

    The legacy keys win, as in transformers.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise GraftError(f"config.json: {key} must be an object, found {describe(value)}")
    where = "rope_scaling" if scaling else "rope_parameters"
    scaling = scaling or {k: v for k, v in params.items() if k != "rope_theta"} or None
    theta = number(hf, "rope_theta", number(params, "rope_theta", 10000.0, positive=True), positive=True)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise GraftError(
            f"config.json: rope scaling type {describe(kind)} is not supported ({', '.join(ROPE_TYPES)})"
        )
    if kind != "default":  # what graft.nn.positions reads, checked here with its key
        checked = {f"{where}.{k}": v for k, v in scaling.items()}
        number(checked, f"{where}.factor", REQUIRED, positive=True)
    if kind == "llama3":
        low = number(checked, f"{where}.low_freq_factor", REQUIRED, positive=True)
        high = number(checked, f"{where}.high_freq_factor", REQUIRED, positive=True)
        integer(checked, f"{where}.original_max_position_embeddings")
        if high <= low:  # the blend between them divides by their difference
            raise GraftError(f"config.json: {where}.high_freq_factor must be greater than low_freq_factor")
    return theta, (scaling if kind != "default" else None)


def sliding_window_from_hf(hf: dict[str, Any], family: str) -> int | None:
    """Mistral: one window for every layer. Qwen2: a window only where layer_types say so."""
    if family == "mistral":
        return integer(hf, "sliding_window", None)
    if family != "qwen2" or not flag(hf, "use_sliding_window", False):
        return None
    layers = integer(hf, "num_hidden_layers", high=MAX_LAYERS)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= integer(hf, "max_window_layers", layers, low=0) else "full_attention"
        for i in range(layers)
    ]
    if not isinstance(types, list) or len(types) != layers:
        raise GraftError(f"config.json: layer_types must list one type per layer ({layers})")
    if len({describe(t) for t in types}) > 1:
        raise GraftError(
            "config.json: sliding window on some layers only (max_window_layers) is not supported"
        )
    return integer(hf, "sliding_window", None) if types[0] == "sliding_attention" else None


def config_from_hf(hf: dict[str, Any], family: str = "llama") -> TransformerConfig:
    hidden, n_heads = integer(hf, "hidden_size"), integer(hf, "num_attention_heads")
    if hf.get("head_dim") is None:  # with a head_dim, the heads need not divide hidden_size
        heads(hf, "hidden_size", "num_attention_heads")
    head_dim = integer(hf, "head_dim", hidden // n_heads)
    n_kv = integer(hf, "num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise GraftError(
            f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
        )
    if head_dim % 2:  # rotary embeddings turn pairs of values
        raise GraftError(f"config.json: the head size {head_dim} (head_dim, or hidden_size / heads) is odd")
    theta, scaling = rope_from_hf(hf)
    attention_bias = flag(hf, "attention_bias", False)
    return TransformerConfig(
        family=family,
        vocab_size=integer(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=integer(hf, "num_hidden_layers", high=MAX_LAYERS),
        num_heads=n_heads,
        intermediate_size=integer(hf, "intermediate_size"),
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_positions=integer(hf, "max_position_embeddings", 2048),
        position="rotary",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rms",
        norm_eps=number(hf, "rms_norm_eps", 1e-6),
        prenorm=True,
        final_norm=True,
        activation=activation_from_hf(hf.get("hidden_act", "silu")),
        gated=True,
        qkv_bias=True if family == "qwen2" else attention_bias,
        out_bias=attention_bias if family == "llama" else False,
        mlp_bias=flag(hf, "mlp_bias", False) if family == "llama" else False,
        causal=True,
        sliding_window=sliding_window_from_hf(hf, family),
        tie_word_embeddings=flag(hf, "tie_word_embeddings", False),
        dropout=0.0,
        attention_dropout=number(hf, "attention_dropout", 0.0, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id"),
        bos_token_id=token_id(hf, "bos_token_id"),
        eos_token_id=token_id(hf, "eos_token_id"),
        hf_config=hf,
    )


def config_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    hf = {
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation],
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps,
        # legacy keys: transformers 4 reads them, and transformers 5 prefers them to rope_parameters
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.family != "qwen2":  # Qwen2 has no head_dim key: always hidden_size / heads
        hf["head_dim"] = cfg.head_dim
    if cfg.family == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.family == "qwen2":
        hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        if cfg.sliding_window is not None:
            hf["max_window_layers"] = 0
    else:
        hf["sliding_window"] = cfg.sliding_window
    return hf


def weight_map(cfg: TransformerConfig) -> WeightMap:
    names = {
        **pair("embed_tokens", "embed.tokens", bias=False),
        **per_layer(layer(cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias), cfg.num_layers),
        **pair("norm", "norm", bias=False),
    }
    return WeightMap(names, ignored=("rotary_emb.inv_freq",), prefix="model.")


def family(name: str, model_types: tuple[str, ...], prefix: str) -> Family:
    return register(
        Family(
            name=name,
            model_types=model_types,
            config_from_hf=lambda hf: config_from_hf(hf, name),
            config_to_hf=config_to_hf,
            weight_map=weight_map,
            architectures={
                "base": f"{prefix}Model",
                "causal-lm": f"{prefix}ForCausalLM",
                "classification": f"{prefix}ForSequenceClassification",
                "token-classification": f"{prefix}ForTokenClassification",
                "question-answering": f"{prefix}ForQuestionAnswering",
            },
            decoder=True,
        )
    )


LLAMA = family("llama", ("llama",), "Llama")
QWEN2 = family("qwen2", ("qwen2",), "Qwen2")
MISTRAL = family("mistral", ("mistral",), "Mistral")
