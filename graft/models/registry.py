"""The registry of model families: tests and the CLI loop over it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from graft.errors import GraftError
from graft.models.weights import WeightMap
from graft.nn.config import EncoderDecoderConfig, TransformerConfig

AnyConfig = TransformerConfig | EncoderDecoderConfig


@dataclass(frozen=True)
class Family:
    """What makes a family: how its config.json and weight names map onto graft's core."""

    name: str
    model_types: tuple[str, ...]  # HF config.json "model_type" values this family reads
    config_from_hf: Callable[[dict[str, Any]], AnyConfig]  # EncoderDecoderConfig for an encoder-decoder
    config_to_hf: Callable[[AnyConfig], dict[str, Any]]
    weight_map: Callable[[AnyConfig], WeightMap]  # names of the whole body: Transformer or EncoderDecoder
    # HF class names per graft task, written to config.json "architectures" on save.
    architectures: dict[str, str] = field(default_factory=dict)
    decoder: bool = False  # causal language model (has an LM head, can generate)
    inputs: str = "tokens"  # what its body reads (TransformerConfig.inputs): tokens, or patches (images)
    # two stacks (T5, BART, Whisper): the body is graft.nn.EncoderDecoder, the generating task "seq2seq"
    encoder_decoder: bool = False
    # a text tower and an image tower (CLIP): the body is graft.nn.DualEncoder, its inputs "image-text"
    dual_encoder: bool = False


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_for(model_type: str | None, source: str = "config.json") -> Family:
    """The family reading this HF model_type, or a GraftError listing the supported ones."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise GraftError(f"{source}: unknown model_type {model_type!r} (supported: {known})")


# ---- config.json values, each checked for its type and range with the key in the message ----
# A config.json decides the model's shapes, so a value out of place must stop here, before a
# model is built from it (load_config puts config.json's path in place of "config.json").

REQUIRED = object()  # no default: the key must be in config.json
MAX_LAYERS = 1024  # deeper than any published transformer (Llama 3.1 405B has 126 layers)


def describe(value: Any) -> str:
    """A config value as config.json spells it: "384" (text), 1e+10, true, null."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key)
    if value is None:  # absent, or null: transformers reads both as "use the default"
        if default is REQUIRED:
            raise GraftError(f"config.json: missing key {key!r}")
        return default
    return value


def integer(
    hf: dict[str, Any], key: str, default: Any = REQUIRED, low: int = 1, high: int | None = None
) -> Any:
    """An int (not a bool, a float or text) in [low, high], or ``default`` when the key is absent."""
    value = _value(hf, key, default)
    if value is default:
        return value
    if type(value) is not int or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high:,}" if high is not None else f">= {low}"
        raise GraftError(f"config.json: {key} must be an integer {bounds}, found {describe(value)}")
    return value


def number(
    hf: dict[str, Any], key: str, default: Any, high: float | None = None, positive: bool = False
) -> float:
    """A finite int or float >= 0 (> 0 if ``positive``, <= ``high`` if given)."""
    value = _value(hf, key, default)
    ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok or (high is not None and value > high):
        bounds = "> 0" if positive else ">= 0" if high is None else f"from 0 to {high}"
        raise GraftError(f"config.json: {key} must be a number {bounds}, found {describe(value)}")
    return float(value)


def flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    value = _value(hf, key, default)
    if type(value) is not bool:
        raise GraftError(f"config.json: {key} must be true or false, found {describe(value)}")
    return value


def token_id(hf: dict[str, Any], key: str, default: int | None = None) -> Any:
    """A token id (an int), or None; eos_token_id may list several."""
    value = _value(hf, key, default)
    ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
    if value is not None and not all(type(i) is int for i in ids):
        raise GraftError(f"config.json: {key} must be a token id (an integer), found {describe(value)}")
    return value


def heads(hf: dict[str, Any], hidden_key: str, heads_key: str) -> tuple[int, int]:
    """(hidden size, attention heads), the first divisible by the second."""
    hidden, n_heads = integer(hf, hidden_key), integer(hf, heads_key)
    if hidden % n_heads:
        raise GraftError(f"config.json: {hidden_key} {hidden} is not divisible by {heads_key} {n_heads}")
    return hidden, n_heads


ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}
ACTIVATIONS_TO_HF = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "relu": "relu",
    "silu": "silu",
    "quick_gelu": "quick_gelu",
}


def activation_from_hf(name: Any, source: str = "config.json") -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS_FROM_HF:
        raise GraftError(
            f"{source}: hidden activation {describe(name)} is not supported ({', '.join(ACTIVATIONS_FROM_HF)})"
        )
    return ACTIVATIONS_FROM_HF[name]


# ---- pruned models: per-block head counts and feed-forward widths ----
# transformers writes the heads it removed as ``pruned_heads`` {"layer": [head, ...]} and prunes a
# model it loads to match; feed-forward widths per block have no transformers key, so graft keeps
# them as ``graft_intermediate_sizes``.


def pruning_from_hf(hf: dict[str, Any], cfg: TransformerConfig) -> TransformerConfig:
    """``cfg`` with the heads per block that config.json's pruned_heads leave, and its per-block widths."""
    if not isinstance(cfg, TransformerConfig):  # an encoder-decoder: two stacks, not pruned by graft
        return cfg
    pruned = hf.get("pruned_heads") or {}
    if not isinstance(pruned, dict):
        raise GraftError(
            f"config.json: pruned_heads must map layers to lists of heads, found {describe(pruned)}"
        )
    counts = [cfg.num_heads] * cfg.num_blocks
    for layer, removed in pruned.items():
        where = f"config.json: pruned_heads[{layer!r}]"
        if not str(layer).isdigit() or int(layer) >= cfg.num_blocks:
            raise GraftError(f"{where}: not a layer of this model (0 to {cfg.num_blocks - 1})")
        ok = isinstance(removed, list) and all(type(h) is int and 0 <= h < cfg.num_heads for h in removed)
        if not ok or len(set(removed)) != len(removed) or len(removed) >= cfg.num_heads:
            raise GraftError(
                f"{where} must list distinct heads from 0 to {cfg.num_heads - 1}, fewer than all,"
                f" found {describe(removed)}"
            )
        counts[int(layer)] -= len(removed)
    sizes = hf.get("graft_intermediate_sizes")
    if sizes is not None and not (
        isinstance(sizes, list)
        and len(sizes) == cfg.num_blocks
        and all(type(n) is int and 1 <= n <= cfg.intermediate_size for n in sizes)
    ):
        raise GraftError(
            f"config.json: graft_intermediate_sizes must list {cfg.num_blocks} integers from 1 to"
            f" {cfg.intermediate_size}, found {describe(sizes)}"
        )
    cfg.heads_per_layer = counts if pruned else None
    cfg.intermediate_sizes = sizes
    cfg.__post_init__()  # the combination checked as any config is (grouped-query, relative positions)
    return cfg


def pruning_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
    """config.json keys of a pruned model: pruned_heads (the original heads removed from each block,
    as transformers reads them) and graft_intermediate_sizes."""
    out: dict[str, Any] = {}
    if not isinstance(cfg, TransformerConfig):  # an encoder-decoder
        return out
    if cfg.heads_per_layer is not None:
        known = cfg.hf_config.get("pruned_heads") or {}
        pruned = {}
        for layer, count in enumerate(cfg.heads_per_layer):
            removed = sorted(known.get(str(layer), known.get(layer, [])))
            if len(removed) != cfg.num_heads - count:  # which ones is unknown: the count is what matters
                removed = list(range(count, cfg.num_heads))
            if removed:
                pruned[str(layer)] = removed
        out["pruned_heads"] = pruned
    if cfg.intermediate_sizes is not None:
        out["graft_intermediate_sizes"] = list(cfg.intermediate_sizes)
    return out
