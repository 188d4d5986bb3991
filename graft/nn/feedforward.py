"""Position-wise feed-forward networks: plain (up, act, down) and gated (SwiGLU/GeGLU)."""

import torch
from torch import nn

from graft.nn.config import TransformerConfig
from graft.nn.linear import ACTIVATIONS, call, fused, packing, plain


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS["quick_gelu"](x)


def activation(name: str) -> nn.Module:
    """The activation as a module (for layers that keep one, e.g. adapters)."""
    modules = {
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "quick_gelu": QuickGELU,
    }
    return modules[name]()  # TransformerConfig validates names at the boundary


class FeedForward(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(h, i, bias=cfg.mlp_bias) if cfg.gated else None
        self.up = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        if self.gate is None:
            return call(self.down, call(self.up, x, self.activation))  # (B, T, I) in between
        if packing() and plain(self.gate) and plain(self.up):  # one matrix multiply for both
            gate, up = fused(x, (self.gate, self.up), (self, "gate_up"))  # (B, T, I) each
            return call(self.down, ACTIVATIONS[self.activation](gate) * up)
        return call(self.down, call(self.gate, x, self.activation) * call(self.up, x))
