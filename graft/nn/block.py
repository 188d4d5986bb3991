"""A transformer block: attention and feed-forward, each wrapped in residual + norm."""

from __future__ import annotations

import torch
from torch import nn

from graft.nn.attention import Attention, KVCache, take_rows
from graft.nn.config import TransformerConfig
from graft.nn.dropout import Dropout
from graft.nn.feedforward import FeedForward
from graft.nn.norm import make_norm


class Block(nn.Module):
    """Post-LN (BERT): x = norm(x + f(x)). Pre-LN (GPT-2, Llama): x = x + f(norm(x)).

    With ``cross=True`` a cross-attention sub-layer over the encoder output sits between
    self-attention and the feed-forward (encoder-decoder models).
    """

    def __init__(self, cfg: TransformerConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = Attention(cfg, layer)
        self.attn_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg, layer, cross=True) if cross else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.ffn = FeedForward(cfg)
        self.ffn_norm = make_norm(cfg)
        self.drop = Dropout(cfg.dropout)

    def sublayer(self, x: torch.Tensor, norm: nn.Module, f) -> torch.Tensor:
        if self.prenorm:
            return x + self.drop(f(norm(x)))
        return norm(x + self.drop(f(x)))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,  # (B, K): only these positions' outputs are wanted
    ) -> torch.Tensor:  # (B, T, H), or (B, K, H) with rows
        if rows is None:
            x = self.sublayer(x, self.attn_norm, lambda h: self.attn(h, mask, is_causal, rotary, cache))
        else:  # keys and values from every position; queries, residual and feed-forward at rows only
            a = self.attn(self.attn_norm(x) if self.prenorm else x, mask, is_causal, rotary, cache, rows=rows)
            x = take_rows(x, rows)  # (B, K, H)
            x = x + self.drop(a) if self.prenorm else self.attn_norm(x + self.drop(a))
        if self.cross_attn is not None:
            x = self.sublayer(x, self.cross_norm, lambda h: self.cross_attn(h, context_mask, context=context))
        return self.sublayer(x, self.ffn_norm, self.ffn)  # (B, T, H)
