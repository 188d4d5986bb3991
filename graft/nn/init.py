"""Initial values of the learned vectors graft's modules make themselves: lookup tables (tokens,
positions, segments, relative positions) and the vectors image patches start with; and whether
a build is on the meta device, where the tables modules compute are left empty.

A model is also built on the meta device, only for its shapes: graft.loading checks a file's
shapes against one before allocating anything, and an exported folder's head is rebuilt on it.
There nothing is drawn or computed. torch's meta ``normal_``, ``randn``, ``pow`` or ``exp`` run Python code that
imports torch._dynamo on its first call: 1.0 s of imports in every process that loads a model (all-
MiniLM-L6-v2's first load 1.17 -> 0.16 s on an AMD EPYC), a CLI command's or a server's start,
for an encoder that never compiles anything.
"""

from __future__ import annotations

import torch
from torch import nn


def on_meta() -> bool:
    """Whether modules are being built on the meta device, for their shapes only: a table a module
    computes (rotary frequencies, sinusoids) is left empty there, as nothing reads it."""
    return torch.empty(0).is_meta


def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
    """A tensor drawn from N(0, std^2) (``nn.init.normal_``'s numbers from the same seed), or an
    empty one on the meta device."""
    values = torch.empty(shape)  # (on the device of the caller's torch.device context)
    return values if values.is_meta else nn.init.normal_(values, std=std)


def lookup_table(rows: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(rows, dim)``, drawn as nn.Embedding draws its weights (N(0, 1))."""
    return nn.Embedding(rows, dim, _weight=normal(rows, dim))
