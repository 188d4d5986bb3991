"""Text generation with the key/value cache (greedy for now; sampling and beams build on it)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from graft.nn import KVCache
from graft.tasks import TaskModel


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


@torch.no_grad()
def stream_greedy(
    model: TaskModel,
    input_ids: torch.Tensor,  # (B, T), left-padded when rows differ in length
    attention_mask: torch.Tensor | None = None,  # (B, T)
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time; finished rows get padding."""
    body = model.body
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    eos = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [], dtype=torch.long
    )
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = KVCache(body.config.num_blocks)
    position_ids = positions_from_mask(mask)
    tokens = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=tokens, attention_mask=mask, position_ids=position_ids, cache=cache, logits_to_keep=1
        )
        next_tokens = out.logits[:, -1].argmax(-1)  # (B,)
        next_tokens = torch.where(done, torch.full_like(next_tokens, pad), next_tokens)
        yield next_tokens
        done |= torch.isin(next_tokens, eos)
        if bool(done.all()):
            return
        tokens = next_tokens[:, None]  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1


def greedy(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt followed by up to max_new_tokens greedy tokens: (B, T + new)."""
    steps = list(stream_greedy(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id))
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1) if steps else input_ids
