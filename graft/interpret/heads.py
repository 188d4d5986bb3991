"""Which attention heads matter: importance scores after Michel, Levy and Neubig (2019), "Are Sixteen
Heads Really Better than One?", the curve of a model's quality as heads are masked in order of
importance (against a random order), and a heat map of the scores per layer x head.

A head's importance is the expected absolute gradient of the loss with respect to a mask on its
output, I_h = E_x |dL/d xi_h| (xi = 1 everywhere, so the model is unchanged): how much the loss
would move if the head were scaled away. The masks are ``graft.nn.attention.MaskedInput`` wrappers
put around each block's output projection for the time of the measurement; the same wrapper over
the feed-forward's down projection scores neurons, which is how pruning (graft.compress.prune)
picks what to remove: one implementation for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn.attention import MaskedInput
from graft.tasks import TaskModel
from graft.tasks.base import one_stack

Batch = dict[str, Any]


@dataclass
class Importance:
    """Per block: one score per head (``heads``) and per feed-forward neuron (``neurons``)."""

    heads: list[torch.Tensor]  # (heads of block i,) each
    neurons: list[torch.Tensor]  # (intermediate width of block i,) each
    batches: int

    def table(self) -> torch.Tensor:
        """(blocks, most heads) scores, NaN where a block has fewer heads (pruned)."""
        width = max(len(h) for h in self.heads)
        out = torch.full((len(self.heads), width), float("nan"))
        for i, h in enumerate(self.heads):
            out[i, : len(h)] = h
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [h.tolist() for h in self.heads], "batches": self.batches}


@contextlib.contextmanager
def masks(model: nn.Module) -> Iterator[tuple[list[nn.Parameter], list[nn.Parameter]]]:
    """Each block's head mask and neuron mask (ones), for the time of the ``with``; the model's own
    layers are put back afterwards, whatever happens inside."""
    blocks = body_of(model).layers
    saved = [(b.attn.o, b.ffn.down) for b in blocks]
    try:
        for b in blocks:
            b.attn.o = MaskedInput(b.attn.o, b.attn.num_heads)
            b.ffn.down = MaskedInput(b.ffn.down, b.ffn.down.weight.shape[1])
        yield [b.attn.o.mask for b in blocks], [b.ffn.down.mask for b in blocks]
    finally:
        for b, (o, down) in zip(blocks, saved, strict=True):
            b.attn.o, b.ffn.down = o, down


def body_of(model: nn.Module) -> nn.Module:
    if not isinstance(model, TaskModel):
        raise GraftError("head importance needs a task model (its loss); this is a bare model without a head")
    return one_stack(model, "head importance")


def importance(model: TaskModel, batches: Iterable[Batch], normalize: bool = True) -> Importance:
    """Michel et al.'s head (and neuron) importance: mean over ``batches`` (with labels) of
    |dL/d mask|. ``normalize``: each block's head scores divided by their L2 norm, as the paper
    does, so layers whose gradients are larger overall do not decide alone."""
    body_of(model)  # a task model with one stack of heads
    training, params = model.training, [p for p in model.parameters()]
    wanted = [p.requires_grad for p in params]
    model.eval()  # no dropout: the gradient of the model as it predicts
    for p in params:
        p.requires_grad_(False)  # only the masks' gradients are wanted
    try:
        with masks(model) as (head_masks, neuron_masks):
            heads = [torch.zeros_like(m, dtype=torch.float64) for m in head_masks]
            neurons = [torch.zeros_like(m, dtype=torch.float64) for m in neuron_masks]
            n = 0
            for batch in batches:
                if batch.get("labels") is None:
                    raise GraftError("head importance needs labelled data (the loss's gradient)")
                loss = model(**batch).loss
                grads = torch.autograd.grad(loss, head_masks + neuron_masks)
                for total, g in zip(heads + neurons, grads, strict=True):
                    total += g.detach().abs().double()
                n += 1
    finally:
        for p, w in zip(params, wanted, strict=True):
            p.requires_grad_(w)
        model.train(training)
    if n == 0:
        raise GraftError("head importance: no data")
    heads = [(h / n).float() for h in heads]
    if normalize:
        heads = [h / h.norm().clamp_min(1e-20) for h in heads]
    return Importance(heads, [(v / n).float() for v in neurons], n)


def order(scores: Importance, random: bool = False, seed: int = 0) -> list[tuple[int, int]]:
    """Every (block, head), least important first (or in a random order drawn from ``seed``)."""
    pairs = [(i, h) for i, s in enumerate(scores.heads) for h in range(len(s))]
    if random:
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
        return [pairs[int(j)] for j in perm]
    values = torch.tensor([float(scores.heads[i][h]) for i, h in pairs])
    return [pairs[int(j)] for j in torch.argsort(values, stable=True)]


@torch.no_grad()
def quality(model: TaskModel, batches: Sequence[Batch]) -> dict[str, float]:
    """Mean loss over the batches' items, and accuracy where the task has classes (the argmax's
    agreement with the labels, ignored positions left out)."""
    loss_sum, items, right, labelled = 0.0, 0.0, 0, 0
    for batch in batches:
        out = model(**batch)
        labels = batch["labels"]
        n = float(model.head.count(labels, batch))
        loss_sum, items = loss_sum + float(out.loss) * n, items + n
        if model.task in ("classification", "token-classification") and out.logits.shape[:-1] == labels.shape:
            keep = labels != -100
            right += int((out.logits.argmax(-1) == labels)[keep].sum())
            labelled += int(keep.sum())
    result = {"loss": loss_sum / max(items, 1.0)}
    if labelled:
        result["accuracy"] = right / labelled
    return result


def masking_curve(
    model: TaskModel,
    batches: Sequence[Batch],
    scores: Importance,
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    seed: int = 0,
) -> list[dict[str, float]]:
    """The model's quality with the given fraction of heads masked, least important first and in a
    random order: one row per fraction ({"fraction", "importance/loss", "random/loss", ...}).

    Every block keeps at least one head, as pruning does (a block without heads has no attention)."""
    rows = [{"fraction": float(f)} for f in fractions]
    model.eval()
    for name, pairs in (("importance", order(scores)), ("random", order(scores, random=True, seed=seed))):
        with masks(model) as (head_masks, _):
            for row in rows:
                for m in head_masks:
                    m.data.fill_(1.0)
                left = [len(m) for m in head_masks]
                wanted, done = round(row["fraction"] * sum(left)), 0
                for i, h in pairs:
                    if done == wanted:
                        break
                    if left[i] > 1:
                        head_masks[i].data[h] = 0.0
                        left[i], done = left[i] - 1, done + 1
                row.update({f"{name}/{k}": v for k, v in quality(model, batches).items()})
    return rows


def heatmap_png(scores: Importance, path: Path, title: str = "head importance") -> Path:
    """A layer x head heat map of the scores (blank where a block has fewer heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graft.io.atomic import atomic_path

    table = scores.table().numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.6 * table.shape[1], 1 + 0.45 * table.shape[0]))
    image = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(table.shape[1]))
    ax.set_yticks(range(table.shape[0]))
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def curve_png(rows: list[dict[str, float]], path: Path, metric: str) -> Path:
    """The masking curve: ``metric`` against the fraction of heads masked, by importance and at random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graft.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["fraction"] for r in rows]
    for name in ("importance", "random"):
        ax.plot(x, [r[f"{name}/{metric}"] for r in rows], marker="o", label=f"{name} order")
    ax.set_xlabel("fraction of heads masked")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
