"""Linear layers through oneDNN's matmul (+ fused activation) on CPU.

On the CPUs graft runs on, oneDNN's fp32 matmul is 5-15% faster than the default BLAS call,
and at inference it applies GELU/ReLU to the output tile while it is still in cache instead of
in a second pass over memory. oneDNN's op has no backward: when gradients are needed, an
autograd function runs oneDNN forward and, backward, the input's gradient as oneDNN's linear
layer of weight.T where that measured faster than torch's matmul (2-3x on large rows: integrated
gradients, adapters over frozen weights), the weight's by torch's matmul (fp32 on CPU; autocast,
torch.compile and other devices take torch's ordinary F.linear). Layers that a
strategy wrapped or hooked are always called as modules, so the wrapper or hook sees every call.

Which of oneDNN on packed weights, oneDNN and torch's F.linear runs a call is chosen per shape
by what they measured on this CPU (``routes``, graft/kernels/calibrate.py): oneDNN is faster on
one processor and slower on another. Weights packed once into oneDNN's blocked layout are kept
in a ``packed`` dict that the caller owns (the model's ``Kernels``, graft/kernels/switch.py):
there is no state in this module.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.feedforward import ACTIVATIONS

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 products need AVX-512 (or AMX); on an AVX2-only CPU (an AMD EPYC 7003) it refuses them
# ("could not create a primitive descriptor"), and bf16 takes torch's matmul
ONEDNN_BF16 = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# activations oneDNN applies to the tile in cache: name -> (its attribute, its algorithm)
FUSED = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # activation name -> F.gelu's approximate


class PackedLinear(nn.Linear):
    """nn.Linear (same weights, same state dict) that reads its packed weight while the model's
    weights are frozen (decoding: oneDNN reads a large vocabulary matrix up to twice as fast),
    and is torch's F.linear otherwise, whose rounding the references' logits share."""

    kernels = None  # the model's Kernels, set by graft.kernels.optimize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.kernels.packed()
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, key=self, packed=packed, routes=self.kernels.calibration)


def plain(layer: nn.Module) -> bool:
    """An unwrapped, unhooked linear layer, whose call graft may replace by its own kernel."""
    return (
        type(layer) in (nn.Linear, PackedLinear) and not layer._forward_hooks and not layer._forward_pre_hooks
    )


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and x.is_cpu
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ONEDNN_BF16))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # torch.compile brings its own kernels
    )


def use_onednn_training(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """fp32 on CPU, plain tensors (not FSDP's DTensors), no autocast, gradients wanted."""
    return (
        ONEDNN
        and torch.is_grad_enabled()
        and x.is_cpu
        and x.dtype == weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)
        and (bias is None or type(bias) in (torch.Tensor, nn.Parameter))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _TrainingLinear(torch.autograd.Function):
    """x @ weight.T + bias: oneDNN forward; backward, the x gradient by oneDNN or torch (``dx_onednn``:
    the route measured for its shape) and the weight's by torch."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dx_onednn: bool = False
    ) -> torch.Tensor:
        # only what backward reads: a frozen weight needs no input saved (adapters, LoRA)
        wants_dx, wants_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if wants_dw else None, weight if wants_dx else None)
        ctx.has_bias, ctx.dx_onednn = bias is not None, dx_onednn
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (..., out)
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0] and ctx.dx_onednn:  # a linear layer of weight.T: 2-3x torch's mm
            dx = torch.ops.mkldnn._linear_pointwise(
                grad.contiguous(), weight.t().contiguous(), None, "none", [], ""
            )
        elif ctx.needs_input_grad[0]:
            dx = grad @ weight  # (..., in)
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[1]:
            dw = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None


def weights_signature(model: nn.Module) -> tuple:
    """Changes when any weight of ``model`` is moved, replaced or updated in place, or one is added."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class Routes(Protocol):
    """Chooses the route of a linear call (graft.kernels.calibrate.Calibration measures them)."""

    def route(
        self, dtype: torch.dtype, rows: int, out: int, inp: int, activation: str, candidates: tuple[str, ...]
    ) -> str: ...


ROUTES = ("packed", "onednn", "torch")  # oneDNN on weights packed once, oneDNN, torch's F.linear


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout (only oneDNN's matmul reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1024)


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """activation(x @ weight.T + bias) by oneDNN (``weight`` plain or packed): GELU/ReLU applied to
    the tile in cache, others (SiLU) after, as the references do."""
    name, algorithm = FUSED.get(activation, ("none", ""))
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, name, [], algorithm)
    return y if activation is None or activation in FUSED else ACTIVATIONS[activation](y)


def torch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """activation(x @ weight.T + bias) by torch's F.linear, the reference's call."""
    y = F.linear(x, weight, bias)
    if activation in GELU and y.requires_grad and not torch.compiler.is_compiling():
        return _Gelu.apply(y, GELU[activation])
    return y if activation is None else ACTIVATIONS[activation](y)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | tuple[torch.Tensor, ...],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    key: object = None,
    packed: dict[object, torch.Tensor] | None = None,
    routes: Routes | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias); activation is a TransformerConfig name or None.

    ``weight`` may be several tensors, concatenated (a fused projection) only when needed.
    ``packed``: while the weights are frozen, the store where ``key`` names this weight's packed
    layout or concatenation, made at its first use. ``routes`` chooses among the routes the call
    allows (oneDNN on packed weights while frozen; oneDNN at inference and in fp32 training;
    torch's F.linear always) by what they measured on this CPU (graft.kernels.calibrate); without
    it, oneDNN wherever it may run.
    """
    parts = weight if isinstance(weight, tuple) else (weight,)
    if use_onednn(x, parts[0]):
        if packed is not None and key is not None:
            candidates = ROUTES
        # Unfrozen, SiLU layers keep torch's matmul: the references' rounding, which the Llama
        # family's logits match to 1e-4 over 30 layers only that way
        elif activation is None or activation in FUSED:
            candidates = ("onednn", "torch")
        else:
            candidates = ("torch",)
        route = choose(routes, x, parts, activation if activation in FUSED else "none", candidates)
        if route == "packed":
            w = packed.get((key, "packed"))
            if w is None:
                w = packed[(key, "packed")] = pack(whole(parts))  # (the concatenation not kept)
            return onednn_linear(x, w, bias, activation)
        w = whole(parts, key, packed)
        return (onednn_linear if route == "onednn" else torch_linear)(x, w, bias, activation)
    w = whole(parts)  # not kept: torch.compile's graph, or a store that must stay empty, holds it
    if use_onednn_training(x, w, bias):
        if choose(routes, x, parts, "none", ("onednn", "torch")) == "onednn":
            # backward's x gradient is a linear layer of weight.T (rows x out -> in): its own route
            rows, (out, inp) = x.numel() // w.shape[1], w.shape
            back = routes.route(x.dtype, rows, inp, out, "none", ("onednn", "torch")) if routes else "onednn"
            y = _TrainingLinear.apply(x, w, bias, back == "onednn")
            if activation in GELU and y.requires_grad and not torch.compiler.is_compiling():
                return _Gelu.apply(y, GELU[activation])
            return y if activation is None else ACTIVATIONS[activation](y)
    return torch_linear(x, w, bias, activation)


def choose(
    routes: Routes | None,
    x: torch.Tensor,  # (..., in)
    parts: tuple[torch.Tensor, ...],  # (out_i, in) each
    activation: str,
    candidates: tuple[str, ...],
) -> str:
    if routes is None or len(candidates) == 1:  # no measurements: oneDNN, packed where it may
        return candidates[0]
    out, inp = parts[0].shape
    for w in parts[1:]:
        out += w.shape[0]
    return routes.route(x.dtype, x.numel() // inp, out, inp, activation, candidates)


def whole(
    parts: tuple[torch.Tensor, ...], key: object = None, packed: dict[object, torch.Tensor] | None = None
) -> torch.Tensor:
    """The weight made of ``parts``: concatenated once per frozen store (fused Q/K/V, gate/up)."""
    if len(parts) == 1:
        return parts[0]
    if packed is None or key is None:
        return torch.cat(parts)
    w = packed.get((key, "weight"))
    if w is None:
        w = packed[(key, "weight")] = torch.cat(parts)
    return w


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
    routes: Routes | None = None,
) -> tuple[torch.Tensor, ...]:
    """x through several plain linear layers as one matrix multiply over their concatenated
    weights (one pass over x); one output per layer. ``key`` names the concatenation in the
    ``packed`` store, which then makes (and packs) it once."""
    bias = None
    if any(m.bias is not None for m in layers):  # Whisper's key projection has none: zeros in its place
        bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in layers])
    weights = tuple(m.weight for m in layers)
    y = linear(x, weights, bias, key=key, packed=packed, routes=routes)  # (..., sum of outs)
    return y.split([m.out_features for m in layers], -1)


def call(
    layer: nn.Module,
    x: torch.Tensor,
    activation: str | None = None,
    packed: dict[object, torch.Tensor] | None = None,
    routes: Routes | None = None,
) -> torch.Tensor:
    """layer(x) then the activation: through ``linear`` for a plain layer, as a module call otherwise."""
    if plain(layer):
        return linear(x, layer.weight, layer.bias, activation, key=layer, packed=packed, routes=routes)
    y = layer(x)
    return y if activation is None else ACTIVATIONS[activation](y)
