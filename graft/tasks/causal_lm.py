"""Causal language modelling: predict the next token (GPT-2, Llama)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.kernels.int8 import tied_output
from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, pad, window

IGNORE = -100  # label of tokens that are not in the loss (prompt, padding)


class LMHead(Head):
    """Hidden states -> vocabulary logits; the weight is the token embedding when tied."""

    task = "causal-lm"

    def __init__(self, body: Transformer) -> None:
        super().__init__()
        cfg = body.config
        self.config = cfg
        self.proj = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = cfg.tie_word_embeddings
        if self.tied:
            self.proj = tied_output(body.embed.tokens, self.proj)  # int8 when the table is

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

    # ---- records in, predictions out ----
    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """``text`` is the whole training text; with ``text_pair``, ``text`` is the prompt and ``text_pair``
        the response, and only the response (and the eos after it) is in the loss (instruction tuning).
        """
        limit = window(self.config, tokenizer, max_length)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        texts = field(records, "text", self.task)
        rows, labels = [], []
        for i, text in enumerate(texts):
            ids = tokenizer.encode(text, padding=False, truncation=False, return_tensors=None).input_ids[0]
            response = records[i].get("text_pair")
            if response is None:
                rows.append(ids + eos)
                labels.append(ids + eos)
                continue
            answer = tokenizer.encode(
                response, padding=False, truncation=False, add_special_tokens=False, return_tensors=None
            ).input_ids[0]
            answer = answer + eos
            rows.append(ids + answer)
            labels.append([IGNORE] * len(ids) + answer)  # the prompt is context, not something to learn
        rows, labels = [r[:limit] for r in rows], [r[:limit] for r in labels]
        ids, mask = pad(rows, tokenizer.pad_token_id or 0)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        batch["labels"], _ = pad(labels, IGNORE)
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'nll', 'tokens'} per record: summed negative log-likelihood of its labelled tokens."""
        labels = batch["labels"][:, 1:]  # (B, T - 1): the token each position predicts
        nll = F.cross_entropy(
            logits[:, :-1].detach().float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )
        counts = (labels != IGNORE).sum(1)
        return [{"nll": float(n), "tokens": int(c)} for n, c in zip(nll.sum(1), counts, strict=True)]

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean loss per token and perplexity over the whole set."""
        from graft.metrics import perplexity

        tokens = sum(p["tokens"] for p in predictions)
        loss = sum(p["nll"] for p in predictions) / max(tokens, 1)
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
