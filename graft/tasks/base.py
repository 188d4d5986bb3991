"""A task model: a transformer body and a task head (chapter 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.nn import Transformer, TransformerConfig, TransformerOutput


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden: TransformerOutput | None = None


class Head(nn.Module):
    """A task head: turns the body's output into logits, and logits + labels into a loss.

    Subclasses set ``task`` (the registry key) and implement forward and (for training) loss;
    ``from_hf``/``to_hf`` map their weights to Hugging Face names for task checkpoints.
    """

    task: str = ""

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        """How many items ``loss`` averages over (examples by default)."""
        return labels.shape[0]

    def hf_names(self) -> dict[str, str]:
        """HF tensor name -> this head's parameter name (empty when tied or weightless)."""
        return {}

    def hf_config(self) -> dict[str, Any]:
        """Keys this head adds to config.json (labels, problem type...)."""
        return {}


BODY_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "cache")


class TaskModel(nn.Module):
    """body + head; ``model(**batch)`` gives logits, and a loss when the batch has labels."""

    def __init__(self, body: Transformer, head: Head) -> None:
        super().__init__()
        self.body = body
        self.head = head

    @property
    def config(self) -> TransformerConfig:
        return self.body.config

    @property
    def task(self) -> str:
        return self.head.task

    def forward(self, **batch: Any) -> TaskOutput:
        out = self.body(**{k: batch[k] for k in BODY_INPUTS if k in batch})
        logits = self.head(out, batch)
        labels = batch.get("labels")
        loss = self.head.loss(logits, labels, batch) if labels is not None else None
        return TaskOutput(logits, loss, out)
