"""Pooling: one vector per sequence from the body's output ([CLS], pooler, mean or last token)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graft.nn import Transformer, TransformerConfig, TransformerOutput

POOLINGS = ("cls", "pooler", "mean", "last")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): average over positions where mask is 1."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def last_token_index(batch: dict[str, Any], cfg: TransformerConfig, shape: torch.Size) -> torch.Tensor:
    """(B,) index of each row's last real token, with left or right padding.

    The attention mask says which tokens are real; without one, tokens that are not the pad id
    (as transformers' *ForSequenceClassification do), else the last position.
    """
    B, T = shape
    real = batch.get("attention_mask")
    if real is None and cfg.pad_token_id is not None and batch.get("input_ids") is not None:
        real = batch["input_ids"] != cfg.pad_token_id
    if real is None:
        return torch.full((B,), T - 1, dtype=torch.long)
    positions = torch.arange(T, device=real.device)  # (T,)
    return (positions * real.to(torch.long)).argmax(-1)  # (B,) the rightmost real position


def pool(how: str, out: TransformerOutput, batch: dict[str, Any], cfg: TransformerConfig) -> torch.Tensor:
    """(B, H) sequence vectors."""
    hidden = out.last_hidden_state  # (B, T, H), or (B, 1, H) when the body computed rows()
    if how == "pooler":
        return out.pooled
    if how == "cls" or (out.rows is not None and how == "last"):
        return hidden[:, 0]
    if how == "mean":
        mask = batch.get("attention_mask")
        return mean_pool(hidden, mask) if mask is not None else hidden.mean(1)
    index = last_token_index(batch, cfg, hidden.shape[:2])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pooled_rows(how: str, batch: dict[str, Any], cfg: TransformerConfig) -> torch.Tensor | None:
    """(B, 1) the one position each sequence is pooled from (None for mean pooling, which reads all).

    A body given these rows computes its last block only there (Transformer.forward).
    """
    ids = batch.get("input_ids")
    x = ids if ids is not None else batch.get("inputs_embeds")
    if how == "mean" or x is None:
        return None
    if how == "last":
        return last_token_index(batch, cfg, x.shape[:2]).to(x.device)[:, None]
    return torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)


def set_pooler(body: Transformer, wanted: bool) -> None:
    """Give the body a pooler (dense + tanh on the first token) or take it away.

    A head that reads the pooler needs one even when the checkpoint had none; TaskModel drops
    it when its head does not read it.
    """
    if wanted and body.pooler is None:
        body.pooler = new_linear(body.config.hidden_size, body.config.hidden_size)
    elif not wanted:
        body.pooler = None
    body.config.pooler = wanted


def new_linear(n_in: int, n_out: int, bias: bool = True, std: float = 0.02) -> nn.Linear:
    """A freshly initialized layer, as transformers initializes a new head: N(0, std), zero bias."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer
