"""Normalization layers: LayerNorm (BERT, GPT-2) and RMSNorm (Llama, T5)."""

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is the same float32 arithmetic in one call (bit for bit); half precision
        # rounds the normalized x before the weight multiplies it, as the references do
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def make_norm(cfg: TransformerConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.hidden_size
    if cfg.norm == "rms":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)
