"""The registry of model families: tests and the CLI loop over it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from graft.errors import GraftError
from graft.models.weights import WeightMap
from graft.nn.config import TransformerConfig


@dataclass(frozen=True)
class Family:
    """What makes a family: how its config.json and weight names map onto graft's core."""

    name: str
    model_types: tuple[str, ...]  # HF config.json "model_type" values this family reads
    config_from_hf: Callable[[dict[str, Any]], TransformerConfig]
    config_to_hf: Callable[[TransformerConfig], dict[str, Any]]
    weight_map: Callable[[TransformerConfig], WeightMap]
    # HF class names per graft task, written to config.json "architectures" on save.
    architectures: dict[str, str] = field(default_factory=dict)
    decoder: bool = False  # causal language model (has an LM head, can generate)


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


def require(hf: dict[str, Any], key: str, source: str = "config.json") -> Any:
    if key not in hf:
        raise GraftError(f"{source}: missing key {key!r}")
    return hf[key]


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


def activation_from_hf(name: str, source: str = "config.json") -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise GraftError(
            f"{source}: hidden activation {name!r} is not supported ({', '.join(ACTIVATIONS_FROM_HF)})"
        )
    return ACTIVATIONS_FROM_HF[name]
