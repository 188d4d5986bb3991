"""Multi-head attention over torch's scaled_dot_product_attention, its masks and its cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig
from graft.nn.positions import apply_rotary


class KVCache:
    """Keys and values of past positions, one preallocated buffer per layer.

    Buffers grow by doubling, so decoding one token writes in place instead of
    concatenating the whole history at every step.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Positions already stored (read before the current forward's layers update it)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, nkv, T, hd) keys/values; return all of them so far."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[2]:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self.lengths[layer] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search picks which hypotheses go on)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on."""
        self.lengths = [min(n, length) for n in self.lengths]


def build_mask(
    key_padding: torch.Tensor | None,
    q_len: int,
    k_len: int,
    causal: bool,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask, True where a query may attend a key; None for "all".

    key_padding is (B, Tk) with 1 for real tokens. The last Tq keys are the queries
    themselves (earlier ones come from the cache). Every query may always attend to itself,
    so a padding query never has an empty row (an all-masked row would give NaN, and NaN
    at a padding position would leak into real ones through 0 * NaN).
    """
    if key_padding is None and not causal:
        return None
    if key_padding is not None and not causal and bool(key_padding.all()):
        return None
    device = key_padding.device if key_padding is not None else None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed = allowed & (k_pos > q_pos - sliding_window)
    mask = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :].bool()  # (B, 1, Tq, Tk)
    return mask | (k_pos == q_pos)[None, None]


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; self-attention or cross-attention."""

    def __init__(self, cfg: TransformerConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.layer, self.cross = layer, cross
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.q = nn.Linear(h, nh * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(h, nkv * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(h, nkv * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(nh * hd, h, bias=cfg.out_bias)
        self.dropout = cfg.attention_dropout
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(hd)
        if cfg.scale_by_inverse_layer:
            self.scale /= layer + 1

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor | None = None,  # bool (B|1, 1, T, S), or float bias (B|1, nh, T, S)
        is_causal: bool = False,  # mask is None and attention is causal over T == S
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,  # (B, S, H) for cross-attention
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        src = x if context is None else context
        S = src.shape[1]
        k = self.k(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, past + S, hd)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
