"""Text in and out of generation: prompts to left-padded ids, tokens to streamed text."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from graft.errors import GraftError
from graft.generation.loop import greedy
from graft.tasks.base import TaskModel
from graft.tasks.collate import pad
from graft.tasks.predict import batches


def encode_prompts(
    tokenizer, prompts: Sequence[str] | Sequence[list[dict[str, Any]]], chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts (or, with ``chat``, message lists, or texts sent as one user message) -> left-padded ids, mask."""
    rows = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            rows.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        else:
            rows.append(
                tokenizer.encode(prompt, truncation=False, padding=False, return_tensors=None).input_ids[0]
            )
    if not any(rows):
        raise GraftError("generation: the prompt is empty")
    return pad(rows, tokenizer.pad_token_id or 0, side="left")


def stream_text(tokenizer, tokens: Iterable[int], stop_at: Sequence[int] = ()) -> Iterator[str]:
    """Text pieces as tokens come; a piece is held back while it ends in an incomplete character."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token in stop_at:
            return
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text


@torch.inference_mode()
def generate_records(
    model: TaskModel,
    tokenizer: Any,
    records: Iterable[dict[str, Any]],
    batch_size: int = 8,
    max_length: int | None = None,
    max_new_tokens: int = 64,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, {'generated': text}) pairs: greedy continuations of each record's ``text`` (causal LM)."""
    device = next(model.parameters()).device
    model.eval()
    for chunk in batches(records, batch_size):
        texts = [r.get("text") or "" for r in chunk]
        # generation appends on the right, so prompts are padded on the left
        enc = tokenizer.encode(texts, max_length=max_length, padding_side="left")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        out = greedy(model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        new = tokenizer.batch_decode(out[:, ids.shape[1] :].tolist())
        yield from zip(chunk, ({"generated": text} for text in new), strict=True)
