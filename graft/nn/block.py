"""A transformer block: attention and feed-forward, each wrapped in residual + norm."""

from __future__ import annotations

import torch
from torch import nn

from graft.nn.attention import Attention, KVCache, take_rows
from graft.nn.config import TransformerConfig
from graft.nn.feedforward import FeedForward
from graft.nn.norm import make_norm


class Block(nn.Module):
    """Post-LN (BERT): x = norm(x + f(x)). Pre-LN (GPT-2, Llama): x = x + f(norm(x)).

    With ``cross=True`` a cross-attention sub-layer over the encoder output sits between
    self-attention and the feed-forward (the decoder of an encoder-decoder model).
    """

    def __init__(self, cfg: TransformerConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = Attention(cfg, layer)
        self.attn_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg, layer, cross=True) if cross else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.ffn = FeedForward(cfg, layer)
        self.ffn_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x: torch.Tensor, f_x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """x plus a sub-layer's output f_x (computed on norm(x) when pre-LN)."""
        return x + self.drop(f_x) if self.prenorm else norm(x + self.drop(f_x))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor | None = None,  # see Attention.forward
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,  # (B, S, H) encoder output, for cross-attention
        context_mask: torch.Tensor | None = None,  # (B, 1, 1, S) bool, the encoder's real tokens
        rows: torch.Tensor | None = None,  # (B, K): only these positions' outputs are wanted
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # (B, T, H) or (B, K, H); attention probabilities
        """The block's output, and (with ``output_attentions``) its attention probabilities:
        self-attention's (B, nh, T, S), then cross-attention's when the block has one."""
        pre = self.attn_norm(x) if self.prenorm else x
        # keys and values from every position; with rows, queries, residual and feed-forward at rows only
        a, probs = self.attn(
            pre, mask, is_causal, rotary, cache, rows=rows, output_attentions=output_attentions
        )
        x = self.residual(x if rows is None else take_rows(x, rows), a, self.attn_norm)  # (B, T|K, H)
        attentions = (probs,) if output_attentions else ()
        if self.cross_attn is not None:
            pre = self.cross_norm(x) if self.prenorm else x
            a, probs = self.cross_attn(  # the cache keeps the context's keys and values after the first step
                pre, context_mask, cache=cache, context=context, output_attentions=output_attentions
            )
            x = self.residual(x, a, self.cross_norm)
            attentions += (probs,) if output_attentions else ()
        pre = self.ffn_norm(x) if self.prenorm else x
        return self.residual(x, self.ffn(pre), self.ffn_norm), attentions  # (B, T|K, H)
