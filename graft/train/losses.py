"""Losses for imbalanced and over-confident classifiers (chapters 5 and 7): label smoothing,
class weights and focal loss, for any head whose labels are class ids (-100 = ignored)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from graft.errors import GraftError
from graft.train.config import TaskSection

IGNORE = -100


def class_loss(
    logits: torch.Tensor,  # (..., C)
    labels: torch.Tensor,  # (...) class ids, IGNORE where there is nothing to predict
    smoothing: float = 0.0,
    weight: torch.Tensor | None = None,  # (C,)
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, summed weight): their ratio is the mean; the weight is what accumulation counts."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE
    target = labels[keep]  # (N,)
    # a head may give logits at the kept labels only (Seq2SeqHead while training): (N, C) already
    kept = logits if logits.shape[0] == target.shape[0] != labels.shape[0] else logits[keep]
    logp = F.log_softmax(kept, dim=-1)  # (N, C)
    nll = -logp.gather(1, target[:, None]).squeeze(1)  # (N,)
    loss = (1 - smoothing) * nll - smoothing * logp.mean(-1) if smoothing else nll
    if gamma:
        loss = (1 - torch.exp(-nll)) ** gamma * loss  # focal: (1 - p_true)^gamma
    w = weight.to(loss.device)[target] if weight is not None else torch.ones_like(loss)
    return (loss * w).sum(), w.sum()


def balanced_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """n / (C * n_c): each class weighs as much in the loss as any other (as scikit-learn's 'balanced')."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


def make_loss(
    cfg: TaskSection, task: str, num_classes: int | None = None, train_labels: list[int] | None = None
) -> tuple[Callable, Callable] | None:
    """(loss_fn, count_fn) replacing the head's loss when smoothing, weights or focal loss are asked for.

    loss_fn(logits, batch) is the mean over what count_fn(batch) counts (items, or their class weights).
    """
    if not (cfg.label_smoothing or cfg.class_weights or cfg.focal_gamma):
        return None
    weight = None
    if cfg.class_weights == "balanced":
        if train_labels is None or num_classes is None:
            raise GraftError("task.class_weights: 'balanced' needs class labels in the training data")
        weight = balanced_weights(train_labels, num_classes)
    elif isinstance(cfg.class_weights, list):
        if num_classes is not None and len(cfg.class_weights) != num_classes:
            raise GraftError(
                f"task.class_weights: {len(cfg.class_weights)} weights for {num_classes} classes"
            )
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    elif cfg.class_weights is not None:
        raise GraftError(
            f"task.class_weights: expected 'balanced' or a list of numbers, got {cfg.class_weights!r}"
        )
    shift = task == "causal-lm"  # position t predicts token t + 1

    def parts(logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if labels.is_floating_point():
            raise GraftError(
                f"task: label smoothing, class weights and focal loss need class ids, not {labels.dtype} labels"
            )
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return class_loss(logits, labels, cfg.label_smoothing, weight, cfg.focal_gamma)

    def loss_fn(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        total, count = parts(logits, batch)
        return total / count.clamp(min=1e-12)

    def count_fn(batch: dict[str, Any]) -> float:
        labels = batch["labels"][:, 1:] if shift else batch["labels"]
        labels = labels[labels != IGNORE]
        return float(weight[labels.cpu()].sum()) if weight is not None else float(labels.numel())

    return loss_fn, count_fn
