"""4-bit linear layers: groups of 32 weights with a scale and a minimum each (chapter 8: compression).

llama.cpp's Q4_1 stores a weight row in blocks of 32 values: a scale d and a minimum m (fp16) and
32 four-bit codes q in 0..15, w = d * q + m. torch's CPU int4 matmul
(``torch.ops.aten._weight_int4pack_mm_for_cpu``) reads groups of 32 codes along the input with
w = (q - 8) * scale + zero, so a Q4_1 block maps onto one group exactly: scale = d, zero = m + 8d.
The layer keeps the packed codes (half a byte per weight, an eighth of fp32's) and (d, m) per group,
never a float copy of the weight. ``quantize_groups`` makes the same groups from float weights
(asymmetric: m = the group's minimum, d = its range / 15), what ``graft quantize --method
int4-weight`` does where no GGUF file's blocks are at hand.

The kernel runs on bfloat16 inputs: with fp32 inputs it takes a generic loop (one row of 576 -> 1536,
1 thread, AMD EPYC: fp32 F.linear 85 us, int4 on fp32 inputs 1662 us, int4 on bf16 inputs 43 us), so
the layer's output is within bfloat16's rounding of x @ dequantized(W).T (fp32 inputs: 3e-5 of 36).

The kernel's packed layout depends on the CPU's vector width (torch interleaves blocks of 64 output
rows on AVX-512, 32 on AVX2), so a saved model holds the codes in a plain layout instead (``codes``
/ ``pack_codes``, two codes per byte, input 2j in the low nibble) and packs them when it loads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # a Q4_1 block, and the int4 matmul's group
ROWS = 16  # the kernel packs output rows in blocks of 16 at least
INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
METHOD = "int4-weight"  # graft quantize's method: 4-bit weights, bf16 activations
TINY = 1e-12  # the smallest scale: a constant group quantizes to its minimum, not NaN


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> codes (out, in) uint8 in 0..15, scales d and minimums m (out, in / 32)
    fp32: w ~= d * q + m in each group of 32 inputs, |error| <= d / 2 (Q4_1's definition)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)  # (out, G, 32)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, G)
    d = ((high - low) / 15).clamp_min(TINY)
    q = torch.round((w - low[..., None]) / d[..., None]).clamp_(0, 15).to(torch.uint8)  # (out, G, 32)
    return q.reshape(out_features, in_features), d, low


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15 -> (out, in / 2) uint8, two per byte (input 2j in the low nibble):
    the portable layout a saved model holds."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """``pack_codes``'s inverse: (out, in / 2) uint8 -> (out, in) uint8 in 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)  # (out, in/2, 2) -> (out, in)


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights, a scale and a minimum per group of 32 inputs, bf16 products.

    State dict: ``weight`` (out, in / 2) uint8 in the CPU int4 matmul's packed layout (this
    machine's: ``codes`` gives the portable one), ``weight_scale`` and ``weight_min`` (out, in / 32)
    fp32, w = weight_scale * q + weight_min per group, and ``bias`` (out,) when the layer has one.
    The kernel's bf16 (scale, zero) pairs are derived from them (``refresh``: at construction and
    after every load_state_dict), not saved. CPU only (the packing is the CPU kernel's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        problem = width_problem(in_features, out_features)
        if problem:
            raise ValueError(f"Int4Linear {problem}")
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // GROUP
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        self.register_buffer("weight_min", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # (in/32, out, 2) bf16: what the kernel reads, made once rather than at every call (derived)
        pairs = torch.zeros(groups, out_features, 2, dtype=torch.bfloat16)
        self.register_buffer("scale_zeros", pairs, persistent=False)
        self.refresh()

    @classmethod
    def from_q4_1(
        cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        """Codes (out, in) in 0..15, scales and minimums (out, in / 32): w = d * q + m, per block."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None)
        layer.weight = pack_for_cpu(q)  # (out, in/2)
        layer.weight_scale, layer.weight_min = d.detach().float().clone(), m.detach().float().clone()
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        layer.refresh()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """``linear`` in groups of 32 inputs (``quantize_groups``); a meta layer stays meta (shapes only)."""
        if linear.weight.is_meta:
            return cls(linear.in_features, linear.out_features, linear.bias is not None).to("meta")
        return cls.from_q4_1(*quantize_groups(linear.weight), linear.bias)

    def refresh(self) -> None:
        """Derive the kernel's bf16 (scale, zero) pairs from ``weight_scale`` and ``weight_min``."""
        if self.weight_scale.is_meta:
            return
        self.scale_zeros = self.pairs(torch.bfloat16)

    def pairs(self, dtype: torch.dtype) -> torch.Tensor:
        """(in / 32, out, 2) in ``dtype``: the kernel's w = (q - 8) * scale + zero is d * q + m."""
        d, m = self.weight_scale.float(), self.weight_min.float()
        return torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.refresh()  # the derived pairs follow the loaded scales

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits=4, group={GROUP}"
        )

    def identity_product(self, scale_zeros: torch.Tensor) -> torch.Tensor:  # -> (out, in)
        """The kernel applied to the identity: the weight it reads, row by row, in scale_zeros' dtype."""
        eye = torch.eye(self.in_features, dtype=scale_zeros.dtype)  # (in, in)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, GROUP, scale_zeros).t()

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer stands for: (out, in) fp32."""
        return self.identity_product(self.pairs(torch.float32)).contiguous()

    def codes(self) -> torch.Tensor:
        """The codes in the portable layout (``pack_codes``): (out, in / 2) uint8. With scale 1 and
        zero 8 the kernel's weight is the code itself, exact in bf16 (integers 0..15)."""
        groups = self.in_features // GROUP
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(groups, self.out_features, 2)
        q = self.identity_product(unit.contiguous())  # (out, in) bf16, integers 0..15
        return pack_codes(q.to(torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.requires_grad or x.dtype not in (torch.float32, torch.bfloat16):
            # a gradient to the input (the kernel has no backward): the same weight, in float
            return F.linear(x, self.dequantized().to(x.device, x.dtype), bias)
        if self.scale_zeros.dtype != torch.bfloat16:  # model.to(dtype) converted the derived pairs too
            self.refresh()
        rows = x.numel() // self.in_features
        # bf16 inputs: the kernel's fast path (fp32 inputs take a generic loop, 40x slower at one row)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, self.in_features).bfloat16(), self.weight, GROUP, self.scale_zeros
        )  # (rows, out)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


def pack_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15 -> (out, in / 2) uint8 in the CPU int4 matmul's layout (this CPU's)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)


def width_problem(in_features: int, out_features: int) -> str:
    """What keeps a layer of these widths off the kernel ("" if nothing): inputs in groups of 32,
    outputs in blocks of 16."""
    if in_features % GROUP:
        return f"has {in_features} inputs, not a multiple of {GROUP} (the 4-bit groups)"
    if out_features % ROWS:
        return f"has {out_features} outputs, not a multiple of {ROWS} (the int4 kernel's blocks)"
    return ""


def int4_linears(module: nn.Module, prefix: str = "") -> list[str]:
    """Replace every nn.Linear inside ``module`` by an Int4Linear made from its weights (in place);
    the replaced names. Layers that already are Int4Linear (a GGUF file's blocks) stay as they are.
    ValueError names a layer whose widths the kernel cannot take (inputs in groups of 32, outputs
    in blocks of 16)."""
    names = []
    for parent_name, parent in list(module.named_modules(prefix=prefix)):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                problem = width_problem(child.in_features, child.out_features)
                if problem:
                    raise ValueError(f"{full} {problem}")
                setattr(parent, name, Int4Linear.from_linear(child))
                names.append(full)
    return names
