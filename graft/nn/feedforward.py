"""Position-wise feed-forward networks: plain (up, act, down) and gated (SwiGLU/GeGLU)."""

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig

# TransformerConfig's activation names -> the function
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda y: y * torch.sigmoid(1.702 * y),
}


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

    def __init__(self, cfg: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate(layer)
        self.gate = nn.Linear(h, i, bias=cfg.mlp_bias) if cfg.gated else None
        self.up = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        act = ACTIVATIONS[self.activation]
        if self.gate is None:
            return self.down(act(self.up(x)))  # (B, T, I) in between
        return self.down(act(self.gate(x)) * self.up(x))
