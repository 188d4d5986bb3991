"""Linear layers, with oneDNN's matmul (+ fused activation) on CPU.

On the CPUs graft runs on, oneDNN's fp32 matmul is 5-15% faster than the default BLAS call,
and at inference it applies GELU/ReLU to the output tile while it is still in cache instead of
in a second pass over memory. oneDNN's op has no backward: when gradients are needed, an
autograd function runs oneDNN forward and torch's matrix multiplies backward (fp32 on CPU;
autocast and other devices take torch's ordinary F.linear). Layers that a strategy wrapped or
hooked are always called as modules, so the wrapper or hook sees every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


def use_onednn_training(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """fp32 on CPU, plain tensors (not FSDP's DTensors), no autocast, gradients wanted."""
    return (
        ONEDNN
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)
        and (bias is None or type(bias) in (torch.Tensor, nn.Parameter))
        and not torch.is_autocast_enabled("cpu")
    )


class _TrainingLinear(torch.autograd.Function):
    """x @ weight.T + bias: oneDNN forward, torch's matrix multiplies backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # only what backward reads: a frozen weight needs no input saved (adapters, LoRA)
        wants_dx, wants_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if wants_dw else None, weight if wants_dx else None)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., out)
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = grad @ weight  # (..., in)
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[1]:
            dw = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


_packed: dict[object, torch.Tensor] | None = None  # inside frozen_weights(): key -> packed weight


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Inside, weights do not change: each is packed into oneDNN's blocked layout once, not at
    every call (4-9% faster matmuls). Only for inference loops that own the model meanwhile."""
    global _packed
    previous, _packed = _packed, {}
    try:
        yield
    finally:
        _packed = previous


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    key: object = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias); activation is a TransformerConfig name or None.

    ``weight`` may be a function making it (a concatenation, say), called only when needed;
    ``key`` names it for frozen_weights(), which then packs it once.
    """
    # other activations (SiLU) keep torch's matmul: its rounding is what the references match
    onednn = activation is None or activation in FUSED
    w = _packed.get(key) if _packed is not None and onednn else None
    if w is None or not use_onednn(x, w):
        w = weight() if callable(weight) and not isinstance(weight, torch.Tensor) else weight
        if not (onednn and use_onednn(x, w)):
            if use_onednn_training(x, w, bias):
                y = _TrainingLinear.apply(x, w, bias)
            else:
                y = F.linear(x, w, bias)
            return y if activation is None else ACTIVATIONS[activation](y)
        if _packed is not None and key is not None:
            w = _packed[key] = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
    name, algorithm = FUSED.get(activation, ("none", ""))  # GELU/ReLU applied to the tile in cache
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, name, [], algorithm)


def call(layer: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """layer(x) then the activation: through ``linear`` for a plain layer, as a module call otherwise."""
    if plain(layer):
        return linear(x, layer.weight, layer.bias, activation, key=layer)
    y = layer(x)
    return y if activation is None else ACTIVATIONS[activation](y)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda y: y * torch.sigmoid(1.702 * y),
}
