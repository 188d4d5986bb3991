"""Position-wise feed-forward networks: plain (up, act, down) and gated (SwiGLU/GeGLU)."""

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(name)  # TransformerConfig validates names at the boundary


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(h, i, bias=cfg.mlp_bias) if cfg.gated else None
        self.up = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.down = nn.Linear(i, h, bias=cfg.mlp_bias)
        self._silu_gate = cfg.gated and cfg.activation == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        gate = F.silu(self.gate(x)) if self._silu_gate else self.act(self.gate(x))
        return self.down(gate * self.up(x))
