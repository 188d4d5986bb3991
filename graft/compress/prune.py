"""Pruning: structured (whole attention heads and feed-forward neurons, physically removed, so the
model is smaller and faster) and unstructured (single weights zeroed, by magnitude or by movement).

Structured pruning keeps, in each block, the heads and neurons that graft.interpret.heads scores
highest (Michel et al. 2019's expected |gradient| of a mask) and cuts the others out of the weight
matrices: Q/K/V's rows and the output projection's columns of a head, the up (and gate) rows and
the down column of a neuron. The config then records the heads and widths per block
(``heads_per_layer``, ``intermediate_sizes``), saved as transformers' ``pruned_heads`` and graft's
``graft_intermediate_sizes`` and loaded back by ``graft.loading.load_model``.

Where the units are ranked (``scope``): across all blocks (global, Michel et al.), or within each
block (layer: the same share of every block, one shape for all). Global ranking saves less time
than its count of removed weights suggests in a classifier that reads one position: the last
block runs its queries and feed-forward at that position only, so its neurons' scores (summed
over one position, not T) are the lowest and go first, and removing them saves almost nothing
(all-MiniLM-L6-v2 on BBC News: half the neurons removed came from the last block; bench/prune.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

import graft.kernels
from graft.errors import GraftError, did_you_mean
from graft.interpret.heads import Importance, importance
from graft.nn import Transformer
from graft.tasks import TaskModel
from graft.tasks.base import one_stack

Batch = dict[str, Any]
# structured pruning: where the least important heads and neurons are ranked (across all blocks,
# or within each block)
SCOPES = ("global", "layer")
# unstructured sparsity: which weights count, and the two ways of choosing them
SPARSITY_METHODS = ("magnitude", "movement")


def body_of(model: nn.Module) -> Transformer:
    """The one stack of blocks pruning works on (two stacks: a one-line error)."""
    return one_stack(model, "prune")


def check_prunable(model: nn.Module) -> None:
    body_of(model)  # one stack
    cfg = body_of(model).config
    if cfg.num_kv_heads != cfg.num_heads:
        raise GraftError(
            f"prune: {cfg.family} shares key/value heads between query heads (grouped-query attention);"
            " removing heads is for models with one key/value head per query head (--heads 0 prunes only --ffn)"
        )
    if cfg.position == "relative" or cfg.cross_attention:
        raise GraftError(f"prune: {cfg.family}'s heads share relative position biases or cross-attention")


def check_scope(scope: str, where: str = "prune: --scope ") -> None:
    """A one-line error unless ``scope`` is one of SCOPES; ``where`` names the setting, value after it."""
    if scope not in SCOPES:  # (Intel Neural Compressor calls the per-layer scope "local")
        hint = did_you_mean(scope, SCOPES, {"local": "layer", "uniform": "layer", "per-layer": "layer"})
        raise GraftError(f"{where}{scope}: not one of {', '.join(SCOPES)}{hint}")


def rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Keep output features ``keep`` of a linear layer, in place (its class, hooks and name stay)."""
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone())
    linear.out_features = len(keep)


def columns(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` of a linear layer, in place."""
    linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
    linear.in_features = len(keep)


def head_features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature indices of ``heads`` (sorted) in a (heads * head_dim) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def remove(
    model: nn.Module,
    heads: dict[int, Sequence[int]] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
) -> nn.Module:
    """Cut ``heads[block]`` (current head indices) and ``neurons[block]`` out of ``model``, in place.

    The result computes what the model computed with those heads' and neurons' outputs masked to
    zero, with smaller weight matrices. The config's per-block counts and the HF ``pruned_heads``
    record (original head indices) follow.
    """
    heads, neurons = heads or {}, neurons or {}
    body = body_of(model)
    cfg = body.config
    if any(heads.values()):
        check_prunable(model)
    kernels = graft.kernels.kernels_of(model)
    if kernels is not None:  # prune the plain layers; the kernels' packed weights are rebuilt after
        graft.kernels.reference(model)
    counts = [b.attn.num_heads for b in body.layers]
    widths = [b.ffn.down.in_features for b in body.layers]
    original = dict(cfg.hf_config.get("pruned_heads") or {})
    for i, removed in sorted(heads.items()):
        block = body.layers[i]
        attn = block.attn
        removed = sorted(set(int(h) for h in removed))
        if any(not 0 <= h < attn.num_heads for h in removed) or len(removed) >= attn.num_heads:
            raise GraftError(
                f"prune: layer {i} has {attn.num_heads} heads; cannot remove {len(removed)}"
                f" (heads {removed}); at least one must stay"
            )
        if not removed:
            continue
        keep = torch.tensor([h for h in range(attn.num_heads) if h not in removed])
        features = head_features(keep, attn.head_dim)
        for linear in (attn.q, attn.k, attn.v):
            rows(linear, features)
        columns(attn.o, features)
        # the original indices of the heads removed now, after any removed before (transformers' record)
        before = sorted(original.get(str(i), []))
        alive = [h for h in range(cfg.num_heads) if h not in before]
        original[str(i)] = sorted(before + [alive[h] for h in removed])
        attn.num_heads = attn.num_kv_heads = len(keep)
        counts[i] = len(keep)
    for i, removed in sorted(neurons.items()):
        ffn = body.layers[i].ffn
        width = ffn.down.in_features
        removed = sorted(set(int(n) for n in removed))
        if any(not 0 <= n < width for n in removed) or len(removed) >= width:
            raise GraftError(
                f"prune: layer {i} has {width} feed-forward neurons; cannot remove {len(removed)}"
            )
        if not removed:
            continue
        keep = torch.tensor([n for n in range(width) if n not in removed])
        for linear in (ffn.up, ffn.gate):
            if linear is not None:
                rows(linear, keep)
        columns(ffn.down, keep)
        widths[i] = len(keep)
    if any(c != cfg.num_heads for c in counts):
        cfg.heads_per_layer = counts
        cfg.hf_config = {**cfg.hf_config, "pruned_heads": {k: v for k, v in original.items() if v}}
    if any(w != cfg.intermediate_size for w in widths):
        cfg.intermediate_sizes = widths
    if kernels is not None:
        graft.kernels.optimize(model, kernels.calibration)
    return model


def least_important(
    scores: Sequence[torch.Tensor],
    fraction: float,
    what: str = "heads",
    where: str | None = None,
    scope: str = "global",
) -> dict[int, list[int]]:
    """The ``fraction`` of all units with the lowest scores: ranked across blocks (``scope``
    "global": each block keeps at least one) or within each block ("layer": every block loses
    the same share, so the blocks keep one shape); ``where`` names the setting in the error
    (default: graft prune's --heads/--ffn)."""
    if scope == "layer":
        return least_important_per_layer(scores, fraction)
    total = sum(len(s) for s in scores)
    wanted = math.floor(fraction * total + 1e-9)
    if wanted > total - len(scores):
        where = where or f"prune: --{what} {fraction}"
        raise GraftError(
            f"{where} asks for {wanted} of {total} {'heads' if what == 'heads' else 'neurons'},"
            f" but each of the {len(scores)} layers keeps at least one ({total - len(scores)} at most)"
        )
    flat = torch.cat([s.float() for s in scores])
    where = [(i, j) for i, s in enumerate(scores) for j in range(len(s))]
    left = [len(s) for s in scores]
    chosen: dict[int, list[int]] = {}
    for k in torch.argsort(flat, stable=True).tolist():
        if wanted == 0:
            break
        i, j = where[k]
        if left[i] > 1:
            chosen.setdefault(i, []).append(j)
            left[i] -= 1
            wanted -= 1
    return chosen


def least_important_per_layer(scores: Sequence[torch.Tensor], fraction: float) -> dict[int, list[int]]:
    """The ``fraction`` of each block's units with its lowest scores (rounded down, as the global
    count is; a fraction below 1 leaves each block one at least): 0.33 of 12 heads is 3 in
    every block, 0.25 of 1536 neurons 384."""
    chosen: dict[int, list[int]] = {}
    for i, s in enumerate(scores):
        wanted = min(math.floor(fraction * len(s) + 1e-9), len(s) - 1)
        if wanted:
            chosen[i] = sorted(torch.argsort(s.float(), stable=True)[:wanted].tolist())
    return chosen


def prune(
    model: TaskModel,
    batches: Iterable[Batch],
    heads: float = 0.0,
    ffn: float = 0.0,
    scores: Importance | None = None,
    scope: str = "global",
) -> tuple[TaskModel, dict[str, Any]]:
    """Remove the least important ``heads`` fraction of all heads and ``ffn`` fraction of all
    feed-forward neurons (importance over ``batches``, labelled); returns the model and a report.

    ``scope`` (SCOPES): "global" ranks units across blocks, so a block that matters less loses
    more (Michel et al.); "layer" takes the same share from every block (as transformers'
    per-layer prune_heads lists and Intel Neural Compressor's local scope do), so every block
    keeps one shape.
    """
    for name, value in (("--heads", heads), ("--ffn", ffn)):
        if not 0.0 <= value < 1.0:
            raise GraftError(f"prune: {name} {value} must be a fraction from 0 to below 1")
    check_scope(scope)
    body_of(model)  # one stack
    if heads:
        check_prunable(model)
    blocks = body_of(model).layers
    for what, fraction, sizes in (  # before the measurement: a fraction too large is one line now
        ("heads", heads, [b.attn.num_heads for b in blocks]),
        ("ffn", ffn, [b.ffn.down.in_features for b in blocks]),
    ):
        least_important([torch.zeros(n) for n in sizes], fraction, what, scope=scope)
    before = sum(p.numel() for p in model.parameters())
    scores = scores if scores is not None else importance(model, batches)
    chosen_heads = least_important(scores.heads, heads, "heads", scope=scope) if heads else {}
    chosen_neurons = least_important(scores.neurons, ffn, "ffn", scope=scope) if ffn else {}
    remove(model, chosen_heads, chosen_neurons)
    cfg = body_of(model).config
    report = {
        "scope": scope,
        "parameters_before": before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "heads_removed": sum(len(v) for v in chosen_heads.values()),
        "neurons_removed": sum(len(v) for v in chosen_neurons.values()),
        "heads_per_layer": [cfg.heads(i) for i in range(cfg.num_blocks)],
        "intermediate_sizes": [cfg.intermediate(i) for i in range(cfg.num_blocks)],
        "importance": scores.to_dict(),
    }
    return model, report


# ---- unstructured sparsity -----------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices of the blocks' linear layers (what unstructured pruning zeroes): not the
    embeddings, norms, biases or the task head."""
    body = body_of(model)
    prefix = "body." if isinstance(model, TaskModel) else ""
    return {
        f"{prefix}layers.{name}": m.weight
        for name, m in body.layers.named_modules()
        if isinstance(m, nn.Linear)
    }


def sparsify(
    model: nn.Module,
    sparsity: float,
    method: str = "magnitude",
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of each block weight matrix with the lowest scores, in place;
    returns the masks (True = kept).

    magnitude: |W|. movement (Sanh et al. 2020): -W * dL/dW accumulated while fine-tuning, given as
    ``scores`` (``movement_scores``): weights moving towards zero go first, whatever their size.
    """
    if method not in SPARSITY_METHODS:
        raise GraftError(f"prune: method {method!r} is not one of {', '.join(SPARSITY_METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise GraftError(f"prune: sparsity {sparsity} must be a fraction from 0 to below 1")
    weights = prunable_weights(model)
    if method == "movement" and (scores is None or set(scores) != set(weights)):
        raise GraftError("prune: movement pruning needs scores for every block weight (movement_scores)")
    keep = {}
    with torch.no_grad():
        for name, w in weights.items():
            score = w.abs() if method == "magnitude" else scores[name]
            k = int(sparsity * w.numel())
            mask = torch.ones_like(w, dtype=torch.bool)
            if k:
                mask.view(-1)[torch.argsort(score.flatten().float(), stable=True)[:k]] = False
            w.mul_(mask)
            keep[name] = mask
    return keep


def movement_scores(model: nn.Module, batches: Iterable[Batch], lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """Movement scores S = -sum_t W_t * dL/dW_t over a short fine-tune of ``batches`` (SGD at ``lr``):
    large where training pushes a weight away from zero, negative where it pulls it to zero."""
    weights = prunable_weights(model)
    scores = {name: torch.zeros_like(w) for name, w in weights.items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for name, w in weights.items():
                if w.grad is not None:
                    scores[name] -= w * w.grad
        optimizer.step()
    model.eval()
    return scores


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros per block weight matrix, and over all of them and over the whole model."""
    weights = prunable_weights(model)
    per = {name: float((w == 0).float().mean()) for name, w in weights.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    size = sum(w.numel() for w in weights.values())
    total = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "block_weights_sparsity": zeros / max(size, 1),
        "model_sparsity": all_zeros / max(total, 1),
        "parameters": total,
        "layers": per,
    }
