"""Continual learning against catastrophic forgetting (chapters 4, 10): EWC and rehearsal.

- EWC (Kirkpatrick et al., 2017): after task A, remember the weights theta_A and how much
  each one mattered, the diagonal Fisher information F (mean squared gradient of the loss).
  While learning task B, add  lambda / 2 * sum_i F_i (theta_i - theta_A,i)^2  to the loss, so
  the weights task A relies on stay close.
- Rehearsal: keep a small random sample of earlier tasks' examples (reservoir sampling) and
  mix it into the new task's data.

``EWC.attach(model)`` adds the penalty to the loss of every training forward pass, so any
training loop (graft's Trainer included) uses it unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class EWC:
    """Elastic weight consolidation over the model's trainable parameters."""

    def __init__(self, model: nn.Module, strength: float = 1000.0) -> None:
        self.model, self.strength = model, strength
        self.anchors: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.handle = None

    def consolidate(self, batches: Iterable[dict[str, Any]]) -> None:
        """Estimate the Fisher diagonal on a finished task's batches and anchor the current weights.

        The Fisher diagonal is the mean over examples of each example's squared loss gradient
        (one backward pass per example: the square of a batch mean would underestimate it).
        Called once per finished task; the Fisher information of several tasks adds up.
        """
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.model.training
        self.model.eval()
        count = 0
        for batch in batches:
            size = len(batch["labels"])
            for i in range(size):
                example = {
                    k: v[i : i + 1] if torch.is_tensor(v) and len(v) == size else v for k, v in batch.items()
                }
                self.model.zero_grad(set_to_none=True)
                self.model(**example).loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach() ** 2
                count += 1
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, torch.zeros_like(f)) + f / max(count, 1)
            self.anchors[n] = params[n].detach().clone()

    def penalty(self) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta_anchor)^2, a scalar with gradients."""
        total = None
        for n, p in self.model.named_parameters():
            if n in self.fisher:
                term = (self.fisher[n] * (p - self.anchors[n]) ** 2).sum()
                total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.strength / 2 * total

    def attach(self, model: nn.Module | None = None) -> EWC:
        """Add the penalty to ``loss`` in every training-mode forward of the model."""
        target = model or self.model

        def add_penalty(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if module.training and getattr(output, "loss", None) is not None and self.fisher:
                output.loss = output.loss + self.penalty()
            return output

        self.detach()
        self.handle = target.register_forward_hook(add_penalty, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class RehearsalBuffer:
    """A fixed-size uniform sample of every example ever added (reservoir sampling)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.items: list[Any] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, examples: Iterable[Any]) -> None:
        for example in examples:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(example)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.items[j] = example

    def __len__(self) -> int:
        return len(self.items)

    def mix(self, examples: Sequence[Any]) -> list[Any]:
        """The new task's examples with the buffer's replayed ones, shuffled together."""
        mixed = list(examples) + list(self.items)
        self.rng.shuffle(mixed)
        return mixed
