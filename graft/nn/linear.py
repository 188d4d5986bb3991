"""Linear layers, with oneDNN's matmul (+ fused activation) for CPU inference.

On the CPUs graft runs on, oneDNN's fp32 matmul is 5-15% faster than the default BLAS call,
and it applies GELU/ReLU to the output tile while it is still in cache instead of in a second
pass over memory. It has no backward, so training (and anything else that needs gradients,
autocast, or another device) takes torch's ordinary F.linear. Layers that a strategy wrapped
or hooked are always called as modules, so the wrapper or hook sees every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FUSED = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def plain(layer: nn.Module) -> bool:
    """An unwrapped, unhooked nn.Linear, whose call graft may replace by its own kernel."""
    return type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T + bias); activation is a TransformerConfig name or None."""
    if use_onednn(x, weight) and (activation is None or activation in FUSED):
        name, algorithm = FUSED[activation] if activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, [], algorithm)
    y = F.linear(x, weight, bias)
    return y if activation is None else ACTIVATIONS[activation](y)


def call(layer: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """layer(x) then the activation: through ``linear`` for a plain layer, as a module call otherwise."""
    if plain(layer):
        return linear(x, layer.weight, layer.bias, activation)
    y = layer(x)
    return y if activation is None else ACTIVATIONS[activation](y)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda y: y * torch.sigmoid(1.702 * y),
}
