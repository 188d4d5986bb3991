"""Multi-head attention over torch's scaled_dot_product_attention, its masks and its cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig
from graft.nn.positions import apply_rotary


class KVCache:
    """Keys and values of past positions, one preallocated buffer per layer.

    Buffers grow by doubling, so decoding one token writes in place instead of
    concatenating the whole history at every step. ``capacity``: positions to allocate at
    once when the final length is known (prompt + new tokens), so they never grow.

    A decoder with cross-attention also keeps, per layer, the keys and values of the encoder's
    output (``cross_keys``, ``cross_values``): they are the same at every step, so they are
    projected once, at the first step (``keep_cross``), and read from here after that.
    """

    def __init__(self, num_layers: int, capacity: int = 64) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.capacity = capacity
        self.cross_keys: list[torch.Tensor | None] = [None] * num_layers  # (B, nkv, S, hd) each
        self.cross_values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Positions already stored (read before the current forward's layers update it)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, nkv, T, hd) keys/values; return all of them so far."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[2]:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), self.capacity)
            new_k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self.lengths[layer] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The encoder output's (B, nkv, S, hd) keys and values for ``layer``, once kept."""
        k, v = self.cross_keys[layer], self.cross_values[layer]
        return None if k is None else (k, v)

    def keep_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the encoder output's (B, nkv, S, hd) keys and values for the steps to come."""
        self.cross_keys[layer], self.cross_values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search picks which hypotheses go on)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)
        for i, (k, v) in enumerate(zip(self.cross_keys, self.cross_values, strict=True)):
            if k is not None:
                self.cross_keys[i], self.cross_values[i] = k.index_select(0, index), v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on."""
        self.lengths = [min(n, length) for n in self.lengths]


@dataclass(frozen=True)
class Segments:
    """The mask of texts laid end to end in one sequence without padding (B = 1, T tokens in all),
    each attending only to its own tokens: an encoder reading several texts at once
    (graft.serve.packing). Everything in a block but attention goes token by token, so it runs on
    the T tokens alone; attention lays them out as R rows of W places, several texts to a row, and
    masks each text off from the others in its row."""

    index: torch.Tensor  # (R * W,) long: the token at each place of the rows (an empty place: any, masked)
    place: torch.Tensor  # (T,) long: each token's place in the rows
    mask: torch.Tensor  # (R, 1, W, W) bool: True where a query may attend a key (its own text's)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:  # (1, T, C) -> (R, W, C)
        R, W = self.mask.shape[0], self.mask.shape[-1]
        return x[0].index_select(0, self.index).view(R, W, x.shape[-1])

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:  # (R, W, C) -> (1, T, C)
        return y.reshape(-1, y.shape[-1]).index_select(0, self.place)[None]

    def rotary_rows(
        self, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # cos, sin: (1, 1, T, hd) -> (R, 1, W, hd)
        return None if rotary is None else tuple(self.to_rows(t[:, 0])[:, None] for t in rotary)


def by_rows(
    attention: nn.Module,
    x: torch.Tensor,  # (1, T, H)
    segments: Segments,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    output_attentions: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (1, T, H); probabilities (R, nh, W, W)
    """An attention layer over texts end to end (``Segments``), run as the rows it lays them in."""
    y, probs = attention(
        segments.to_rows(x),
        segments.mask,
        rotary=segments.rotary_rows(rotary),
        output_attentions=output_attentions,
    )
    return segments.to_tokens(y), probs


def build_mask(
    key_padding: torch.Tensor | None,
    q_len: int,
    k_len: int,
    causal: bool,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask, True where a query may attend a key; None when every query sees every key.

    key_padding is (B, Tk) with 1 for real tokens. Encoders get a (B, 1, 1, Tk) key mask
    (every row keeps its real tokens). Decoders get (B|1, 1, Tq, Tk); the last Tq keys are
    the queries themselves (earlier ones come from the cache), and every query may always
    attend to itself, so a left-padding query never has an empty row: an all-masked row
    gives NaN, which would leak into real positions through 0 * NaN.
    """
    if not causal:
        if key_padding is None or bool(key_padding.all()):
            return None
        return key_padding[:, None, None, :].bool()
    device = key_padding.device if key_padding is not None else device
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
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
        if not cross and cfg.heads_per_layer is not None:  # pruned: this block's heads (no grouped-query)
            nh = nkv = cfg.heads(layer)
        self.layer, self.cross = layer, cross
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.q = nn.Linear(h, nh * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(h, nkv * hd, bias=cfg.qkv_bias and cfg.key_bias)
        self.v = nn.Linear(h, nkv * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(nh * hd, h, bias=cfg.out_bias)
        self.dropout = cfg.attention_dropout
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(hd)
        if cfg.scale_by_inverse_layer:
            self.scale /= layer + 1

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor | Segments | None = None,  # bool (B|1, 1, T, S), True = may attend; or bias
        # (B|1, nh, T, S); or the texts x holds end to end (Segments)
        is_causal: bool = False,  # mask is None and attention is causal over T == S
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (B|1, 1, T, hd) each
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,  # (B, S, H) for cross-attention
        rows: torch.Tensor | None = None,  # (B, K): only these queries' outputs are wanted
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, T, H) or (B, K, H) with rows; probabilities
        """The attention output, and its probabilities (B, nh, T, S) when ``output_attentions``.

        Cross-attention with a cache projects the encoder output's keys and values at the
        first step only and reads them from the cache after that.
        """
        if isinstance(mask, Segments):
            return by_rows(self, x, mask, rotary, output_attentions)
        src = x if context is None else context  # keys and values come from here
        B, S = x.shape[0], src.shape[1]
        q = self.q(x if rows is None else take_rows(x, rows))  # (B, T, nh * hd); T = K with rows
        T = q.shape[1]
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        kept = cache.cross(self.layer) if cache is not None and self.cross else None
        if kept is not None:
            return self.attend(q, *kept, mask, is_causal, output_attentions)
        k = self.k(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        q, k, v, mask = self.positioned(q, k, v, rotary, cache, mask, rows)
        return self.attend(q, k, v, mask, is_causal, output_attentions)

    def positioned(
        self,
        q: torch.Tensor,  # (B, nh, T, hd); T = K with rows
        k: torch.Tensor,  # (B, nkv, S, hd)
        v: torch.Tensor,  # (B, nkv, S, hd)
        rotary: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin: (B|1, 1, S, hd), the positions of x
        cache: KVCache | None,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None,  # (B, K)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries and keys rotated to their positions, the cache's keys and values joined (or, for
        cross-attention, kept for the steps to come), and the mask cut to the queries' ``rows``."""
        B = q.shape[0]
        if rotary is not None:
            cos, sin = rotary
            k = apply_rotary(k, cos, sin)
            if rows is not None:  # the queries' own positions
                cos, sin = (take_rows(t.expand(B, -1, -1, -1), rows, dim=2) for t in rotary)  # (B, 1, K, hd)
            q = apply_rotary(q, cos, sin)
        if cache is not None and self.cross:
            k, v = cache.keep_cross(self.layer, k, v)  # (B, nkv, S, hd), for the steps to come
        elif cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, past + S, hd)
        if rows is not None and mask is not None and mask.shape[2] > 1:
            mask = take_rows(mask.expand(B, -1, -1, -1), rows, dim=2)  # (B, 1|nh, K, S)
        return q, k, v, mask

    def attend(
        self,
        q: torch.Tensor,  # (B, nh, T, hd)
        k: torch.Tensor,  # (B, nkv, S, hd)
        v: torch.Tensor,  # (B, nkv, S, hd)
        mask: torch.Tensor | None,
        is_causal: bool,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, T, H); probabilities (B, nh, T, S)
        """softmax(q k^T * scale + mask) v, heads merged and projected out."""
        B, T = q.shape[0], q.shape[2]
        p = self.dropout if self.training else 0.0
        probs = None
        if output_attentions:  # the math path, which has the probabilities to return
            y, probs = attention_math(q, k, v, mask, is_causal, p, self.scale)
        else:
            gqa = self.num_kv_heads != self.num_heads
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=self.scale, enable_gqa=gqa
            )  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)), probs


class MaskedInput(nn.Module):
    """A linear layer whose input is gated per unit: ``base(x * mask)``, the mask repeated over
    each unit's ``x.shape[-1] / units`` features. Over attention's output projection (units =
    heads) it is Michel et al.'s head mask (2019); over the feed-forward's down projection (units =
    neurons) it masks neurons. A mask of ones changes nothing; its gradient says how much the loss
    depends on each unit (graft.interpret.heads), and zeros remove units as pruning would."""

    def __init__(self, base: nn.Module, units: int) -> None:
        super().__init__()
        self.base = base
        self.mask = nn.Parameter(torch.ones(units, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., units * width) -> base's output
        gated = x.unflatten(-1, (self.mask.shape[0], -1)) * self.mask[:, None]  # (..., units, width)
        return self.base(gated.flatten(-2))


def attention_math(
    q: torch.Tensor,  # (B, nh, T, hd)
    k: torch.Tensor,  # (B, nkv, S, hd)
    v: torch.Tensor,  # (B, nkv, S, hd)
    mask: torch.Tensor | None,  # bool, True = may attend, or a float bias; broadcast to (B, nh, T, S)
    is_causal: bool,
    p: float,  # attention dropout
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dropout(softmax(q k^T * scale + mask)) v, written out: (output (B, nh, T, hd), probabilities (B, nh, T, S))."""
    group = q.shape[1] // k.shape[1]  # query heads per key/value head
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, nh, S, hd)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, S)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = scores.softmax(-1)  # (B, nh, T, S)
    return F.dropout(probs, p) @ v, probs


def take_rows(x: torch.Tensor, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x's positions ``rows`` (B, K) along ``dim`` (batch first): (B, ..., T, ...) -> (B, ..., K, ...)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = rows.shape
    index = rows.view(shape).expand(*x.shape[:dim], rows.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, index)
