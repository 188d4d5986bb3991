"""Transfer strategies (chapters 4, 5, 10): what trains, written once and applied to any model.

from graft.strategies import apply_strategy
model = apply_strategy(model, "lora:r=8,alpha=16")   # logs trainable / total parameters
"""

from graft.strategies import adapter, freeze, lora, prompt  # noqa: F401  (registers the strategies)
from graft.strategies.adapter import Adapter, remove_adapters
from graft.strategies.base import (
    STRATEGIES,
    ParameterCount,
    Strategy,
    apply_strategy,
    count_parameters,
    parse_strategy,
)
from graft.strategies.checkpoint import save_trained
from graft.strategies.continual import EWC, RehearsalBuffer
from graft.strategies.freeze import CachedFeatures
from graft.strategies.lora import (
    LoRALinear,
    exportable,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)
from graft.strategies.lr import GradualUnfreezing, layerwise_param_groups
from graft.strategies.multitask import MultitaskLoader, MultitaskModel, task_probabilities
from graft.strategies.prompt import PrefixAttention, PromptEmbeddings

__all__ = [
    "EWC",
    "STRATEGIES",
    "Adapter",
    "GradualUnfreezing",
    "MultitaskLoader",
    "MultitaskModel",
    "PrefixAttention",
    "PromptEmbeddings",
    "RehearsalBuffer",
    "CachedFeatures",
    "LoRALinear",
    "ParameterCount",
    "Strategy",
    "apply_strategy",
    "count_parameters",
    "exportable",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "layerwise_param_groups",
    "parse_strategy",
    "remove_adapters",
    "task_probabilities",
    "save_adapter",
    "save_trained",
    "unmerge",
]
