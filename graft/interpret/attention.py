"""Attention as an explanation (chapter 6): the maps themselves, the last layer's, and rollout.

The maps are the reference attention's probabilities (``output_attentions``: the written-out
math, equal to transformers' eager attention for every family). Rollout (Abnar & Zuidema 2020)
follows attention through the residual stream: each layer's head-averaged map is mixed half
and half with the identity (the residual), rows renormalized, and the layers multiplied from
the first up, so row i of the product says how much each input token reaches position i.
"""

from __future__ import annotations

import torch

from graft.interpret.subject import Subject


@torch.no_grad()
def attention_maps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(L, B, nh, T, T) every layer's attention probabilities for a batch of the body's inputs."""
    body = getattr(model, "body", model)
    inputs = {
        k: v
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    }
    out = body(**inputs, output_attentions=True)
    return torch.stack(out.attentions)  # (L, B, nh, T, T)


def rollout(maps: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """(T, T) rollout of one row's maps (L, nh, T, T): prod over layers of (1-r) mean_heads(A) + r I."""
    L, _, T, _ = maps.shape
    eye = torch.eye(T, dtype=maps.dtype, device=maps.device)
    flow = eye
    for layer in range(L):
        a = (1 - residual) * maps[layer].mean(0) + residual * eye  # (T, T)
        a = a / a.sum(-1, keepdim=True)
        flow = a @ flow  # layer l's mix of what reached each position so far
    return flow


def attention_scores(subject: Subject, method: str = "attention") -> tuple[list[float], torch.Tensor]:
    """(per-token scores, maps (L, nh, T, T)): the target's query rows of the last layer's
    head-averaged attention ('attention') or of the rollout ('rollout'), averaged over the rows."""
    maps = attention_maps(subject.model, subject.batch)[:, 0].float()  # (L, nh, T, T)
    matrix = rollout(maps) if method == "rollout" else maps[-1].mean(0)  # (T, T)
    scores = matrix[subject.query()].mean(0)  # (T,)
    return scores.tolist(), maps
