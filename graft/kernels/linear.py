"""Linear layers through oneDNN's matmul (+ fused activation) on CPU.

On the CPUs graft runs on, oneDNN's fp32 matmul is 5-15% faster than the default BLAS call,
and at inference it applies GELU/ReLU to the output tile while it is still in cache instead of
in a second pass over memory. oneDNN's op has no backward: when gradients are needed, an
autograd function runs oneDNN forward and torch's matrix multiplies backward (fp32 on CPU;
autocast, torch.compile and other devices take torch's ordinary F.linear). Layers that a
strategy wrapped or hooked are always called as modules, so the wrapper or hook sees every call.

Weights packed once into oneDNN's blocked layout are kept in a ``packed`` dict that the caller
owns (the model's ``Kernels``, graft/kernels/switch.py): there is no state in this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.feedforward import ACTIVATIONS

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FUSED = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


class PackedLinear(nn.Linear):
    """nn.Linear (same weights, same state dict) that reads its packed weight while the model's
    weights are frozen (decoding: oneDNN reads a large vocabulary matrix up to twice as fast),
    and is torch's F.linear otherwise, whose rounding the references' logits share."""

    kernels = None  # the model's Kernels, set by graft.kernels.optimize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.kernels.packed()
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, key=self, packed=packed)


def plain(layer: nn.Module) -> bool:
    """An unwrapped, unhooked linear layer, whose call graft may replace by its own kernel."""
    return (
        type(layer) in (nn.Linear, PackedLinear) and not layer._forward_hooks and not layer._forward_pre_hooks
    )


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # torch.compile brings its own kernels
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
        and not torch.compiler.is_compiling()
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


def weights_signature(model: nn.Module) -> tuple:
    """Changes when any weight of ``model`` is moved, replaced or updated in place, or one is added."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    key: object = None,
    packed: dict[object, torch.Tensor] | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias); activation is a TransformerConfig name or None.

    ``weight`` may be a function making it (a concatenation, say), called only when needed.
    ``packed``: while the weights are frozen, the store of packed weights, where ``key`` names
    this one (packed at its first use).
    """
    # Unfrozen, SiLU layers keep torch's matmul: the references' rounding, which the Llama
    # family's logits match to 1e-4 over 30 layers only that way
    onednn = activation is None or activation in FUSED or packed is not None
    w = packed.get(key) if packed is not None else None
    if w is None or not use_onednn(x, w):
        w = weight() if callable(weight) and not isinstance(weight, torch.Tensor) else weight
        if not (onednn and use_onednn(x, w)):
            if use_onednn_training(x, w, bias):
                y = _TrainingLinear.apply(x, w, bias)
            else:
                y = F.linear(x, w, bias)
            if activation in GELU and y.requires_grad and not torch.compiler.is_compiling():
                return _Gelu.apply(y, GELU[activation])
            return y if activation is None else ACTIVATIONS[activation](y)
        if packed is not None and key is not None:
            w = packed[key] = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
    # GELU/ReLU are applied to the tile in cache; others (SiLU) after, as the references do
    name, algorithm = FUSED.get(activation, ("none", ""))
    y = torch.ops.mkldnn._linear_pointwise(x, w, bias, name, [], algorithm)
    return y if activation is None or activation in FUSED else ACTIVATIONS[activation](y)


GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # activation name -> F.gelu's approximate


class _Gelu(torch.autograd.Function):
    """F.gelu whose backward writes the input's gradient over the output's: the feed-forward's
    (B, T, I) gradient exists once instead of twice at the moment memory peaks in backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(y)
        ctx.approximate = approximate
        return F.gelu(y, approximate=approximate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        # the gradient comes fresh from the next linear's backward; write over it when it is a
        # plain tensor of its own (an expanded or shared one gets a new tensor)
        if grad.is_contiguous() and grad.shape == y.shape and grad.dtype == y.dtype and not grad._is_view():
            return torch.ops.aten.gelu_backward.grad_input(
                grad, y, approximate=ctx.approximate, grad_input=grad
            ), None
        return torch.ops.aten.gelu_backward(grad, y, approximate=ctx.approximate), None


def fused(
    x: torch.Tensor,
    layers: tuple[nn.Linear, ...],
    key: object,
    packed: dict[object, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """x through several plain linear layers as one matrix multiply over their concatenated
    weights (one pass over x); one output per layer. ``key`` names the concatenation in the
    ``packed`` store, which then makes and packs it once."""
    bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
    weight = lambda: torch.cat([m.weight for m in layers])  # noqa: E731 (made only when needed)
    return linear(x, weight, bias, key=key, packed=packed).split([m.out_features for m in layers], -1)


def call(
    layer: nn.Module,
    x: torch.Tensor,
    activation: str | None = None,
    packed: dict[object, torch.Tensor] | None = None,
) -> torch.Tensor:
    """layer(x) then the activation: through ``linear`` for a plain layer, as a module call otherwise."""
    if plain(layer):
        return linear(x, layer.weight, layer.bias, activation, key=layer, packed=packed)
    y = layer(x)
    return y if activation is None else ACTIVATIONS[activation](y)
