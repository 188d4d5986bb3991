"""Causal language modelling: predict the next token (GPT-2, Llama)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head


class LMHead(Head):
    """Hidden states -> vocabulary logits; the weight is the token embedding when tied."""

    task = "causal-lm"

    def __init__(self, body: Transformer) -> None:
        super().__init__()
        cfg = body.config
        self.proj = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = cfg.tie_word_embeddings
        if self.tied:
            self.proj.weight = body.embed.tokens.weight

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        hidden = out.last_hidden_state  # (B, T, H)
        keep = batch.get("logits_to_keep")
        if keep:  # generation only needs the last position(s)
            hidden = hidden[:, -keep:]
        return self.proj(hidden)  # (B, T, V)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy of each position predicting the next token; label -100 is ignored."""
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        return F.cross_entropy(shifted.float(), labels[:, 1:].reshape(-1), ignore_index=-100)

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        return int((labels[:, 1:] != -100).sum())

    def hf_names(self) -> dict[str, str]:
        return {} if self.tied else {"lm_head.weight": "proj.weight"}
