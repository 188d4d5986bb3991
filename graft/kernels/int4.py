"""4-bit linear layers that decode straight from a GGUF file's Q4_1 blocks (chapter 8: compression).

llama.cpp's Q4_1 stores a weight row in blocks of 32 values: a scale d and a minimum m (fp16) and
32 four-bit codes q in 0..15, w = d * q + m. torch's CPU int4 matmul
(``torch.ops.aten._weight_int4pack_mm_for_cpu``) reads groups of 32 codes along the input with
w = (q - 8) * scale + zero, so a Q4_1 block maps onto one group exactly: scale = d, zero = m + 8d.
The layer keeps the packed codes (half a byte per weight, an eighth of fp32's) and one (scale, zero)
pair per block, never a float copy of the weight.

The kernel runs on bfloat16 inputs: with fp32 inputs it takes a generic loop (one row of 576 -> 1536,
1 thread, AMD EPYC: fp32 F.linear 85 us, int4 on fp32 inputs 1662 us, int4 on bf16 inputs 43 us), so
the layer's output is within bfloat16's rounding of x @ dequantized(W).T (fp32 inputs: 3e-5 of 36).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # a Q4_1 block, and the int4 matmul's group
INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    """A bias-free linear layer with a packed int4 weight and a (scale, zero) per block of 32 inputs.

    State dict: ``weight`` (out, in / 2) uint8 in the CPU int4 matmul's layout, ``scale_zeros``
    (in / 32, out, 2) fp32 (its bf16 copy is derived by ``from_q4_1``, the one constructor that fills
    the layer: it is load-time only). CPU only (the packing is the CPU kernel's).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"in_features must be a multiple of {GROUP}, not {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_zeros", torch.zeros(in_features // GROUP, out_features, 2))
        # the bf16 copy forward's kernel reads, made once rather than at every call (derived: not saved)
        self.register_buffer("scale_zeros_bf16", self.scale_zeros.bfloat16(), persistent=False)

    @classmethod
    def from_q4_1(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Linear:
        """Codes (out, in) in 0..15, scales and minimums (out, in / 32): w = d * q + m, per block."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features)
        layer.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)  # (out, in/2)
        d, m = d.float(), m.float()
        # (in/32, out, 2): the kernel's w = (q - 8) * scale + zero is Q4_1's d * q + m
        layer.scale_zeros = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()
        layer.scale_zeros_bf16 = layer.scale_zeros.bfloat16()
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group={GROUP}"

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer stands for: (out, in) fp32 (the kernel applied to the identity)."""
        eye = torch.eye(self.in_features)  # (in, in)
        return self.int4_mm(eye).t().contiguous()  # (out, in)

    def int4_mm(self, x: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out)
        scale_zeros = self.scale_zeros_bf16 if x.dtype == torch.bfloat16 else self.scale_zeros.to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, scale_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.requires_grad or x.dtype not in (torch.float32, torch.bfloat16):
            # a gradient to the input (the kernel has no backward): the same weight, in float
            return F.linear(x, self.dequantized().to(x.device, x.dtype))
        rows = x.numel() // self.in_features
        # bf16 inputs: the kernel's fast path (fp32 inputs take a generic loop, 40x slower at one row)
        y = self.int4_mm(x.reshape(rows, self.in_features).bfloat16())  # (rows, out)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
