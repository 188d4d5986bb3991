"""Position schemes (chapter 2). Where each one plugs in:

- learned and sinusoidal absolute positions are added to the token embeddings (``Embeddings``);
- rotary positions rotate queries and keys inside attention (``Rotary`` gives cos/sin once per
  forward, every layer applies them);
- relative position bias is added to the attention scores (``RelativePositionBias`` gives one
  (1, nh, Tq, Tk) bias per forward, shared by every layer, as in T5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn.config import TransformerConfig
from graft.nn.init import lookup_table, on_meta


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": sin on even, cos on odd dimensions."""
    if on_meta():  # a model built for its shapes
        return torch.empty(num_positions, dim)
    # float64 then rounded once, so the table equals the reference tables to the last bit.
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.float()  # (P, D)


def timing_signal(num_positions: int, dim: int) -> torch.Tensor:
    """tensor2tensor's sinusoids, as Whisper's encoder adds them: sines in the first half, cosines
    in the second, timescales from 1 to 10000 (computed in float32 as the references do)."""
    if on_meta():  # a model built for its shapes
        return torch.empty(num_positions, dim)
    step = math.log(10000) / (dim // 2 - 1)
    inv_timescales = torch.exp(-step * torch.arange(dim // 2))  # (D/2,)
    angles = torch.arange(num_positions)[:, None] * inv_timescales[None, :]  # (P, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (P, D)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position embeddings; nothing to learn, nothing saved."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(num_positions, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.table[position_ids]


def rope_inverse_frequencies(cfg: TransformerConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dimensions and the cos/sin scale, per rope_scaling."""
    dim = cfg.head_dim
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if on_meta() and kind in ("default", "linear", "llama3"):  # a model built for its shapes
        return torch.empty(dim // 2), 1.0
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (hd/2,)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by factor, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    raise GraftError(f"config: rope_scaling type {kind!r} is not supported (default, linear, llama3)")


class Rotary(nn.Module):
    """Rotary position embeddings: cos/sin tables for the given positions."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inverse_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
        cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
        return cos[:, None].to(dtype), sin[:, None].to(dtype)  # (B, 1, T, hd) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by the position angle (the "rotate half" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin  # (B, nh, T, hd)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias: one learned scalar per (bucket, head)."""

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
    ):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.bias = lookup_table(num_buckets, num_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """Exact buckets for small distances, logarithmic ones up to max_distance."""
        buckets = torch.zeros_like(relative)
        n = self.num_buckets
        if self.bidirectional:
            n //= 2
            buckets += (relative > 0).long() * n
            relative = relative.abs()
        else:
            relative = -torch.clamp(relative, max=0)
        exact = n // 2
        is_small = relative < exact
        large = (
            exact
            + (torch.log(relative.float() / exact) / math.log(self.max_distance / exact) * (n - exact)).long()
        )
        large = torch.clamp(large, max=n - 1)
        return buckets + torch.where(is_small, relative, large)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        q_pos = torch.arange(offset, offset + q_len, device=self.bias.weight.device)[:, None]
        k_pos = torch.arange(k_len, device=self.bias.weight.device)[None, :]
        values = self.bias(self.bucket(k_pos - q_pos))  # (Tq, Tk, nh)
        return values.permute(2, 0, 1)[None]  # (1, nh, Tq, Tk)
