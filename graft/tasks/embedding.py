"""Sentence embeddings: mean of the last hidden states over real tokens (chapter 9, semantic search)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graft.nn import Transformer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): average over positions where mask is 1."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: (ids, mask), each (B, T_max)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.inference_mode()
def embed(
    model: Transformer,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """(N, H) sentence embeddings, in the order of ``texts``.

    Texts are encoded once without padding, then batched by length (longest first), so a
    batch carries almost no padding; results are put back in the input order.
    """
    if not texts:
        return torch.zeros(0, model.config.hidden_size)
    limit = min(max_length or model.config.max_positions, model.config.max_positions)
    enc = tokenizer.encode(list(texts), max_length=limit, padding=False, return_tensors=None)
    order = sorted(range(len(texts)), key=lambda i: -len(enc.input_ids[i]))
    pad_id = tokenizer.pad_token_id or 0
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad([enc.input_ids[i] for i in rows], pad_id)
        types, _ = pad([enc.token_type_ids[i] for i in rows], 0)
        hidden = model(ids, mask, token_type_ids=types).last_hidden_state  # (B, T, H)
        out[rows] = mean_pool(hidden, mask).float()
    return F.normalize(out, dim=-1) if normalize else out
