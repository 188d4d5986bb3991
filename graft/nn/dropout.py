"""Dropout with cheap masks on CPU.

On CPU, torch draws one 32-bit number from its Mersenne twister per element of a dropout
mask, on one thread: in a training step of a small encoder that is the slowest operation
after the matrix multiplies (about a sixth of all the time for MiniLM at 128 tokens). graft
draws 64 random bits per four elements instead and compares each 16-bit lane with the rate,
so the rate is rounded to a multiple of 1/65536 (0.1 becomes 0.100006) and the kept values are
scaled by 1 / (1 - that rate): the same unbiased dropout, four to five times faster. Masks come
from torch's global generator, so seeding, and saving and restoring its state, work as before.
On CUDA, and under torch.compile (which generates its own), torch's dropout is used as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # values of one 16-bit lane


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(mask of the elements kept: uint8 0 or 1, the scale of the kept values) for dropout rate p.

    uint8 rather than bool: torch multiplies a float tensor by a uint8 one twice as fast.
    """
    n = shape.numel()
    dropped = round(p * LANES)  # lanes below this threshold drop their element
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = bits.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return (lanes >= dropped - LANES // 2).view(torch.uint8), LANES / (LANES - dropped)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with graft's cheap masks on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return _Dropout.apply(x, keep, scale)


class Dropout(nn.Dropout):
    """nn.Dropout (same ``p``, same state dict, same repr) drawing graft's cheap masks on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
