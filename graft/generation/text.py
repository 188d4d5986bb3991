"""Text in and out of generation: prompts to left-padded ids, tokens to streamed text."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch

from graft.errors import GraftError
from graft.generation.config import GenerationConfig
from graft.generation.loop import generate, greedy
from graft.tasks.base import TaskModel
from graft.tasks.collate import pad, to_device
from graft.tasks.predict import batches


def encode_prompts(
    tokenizer,
    prompts: Sequence[str] | Sequence[list[dict[str, Any]]],
    chat: bool = False,
    side: Literal["left", "right"] = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts (or, with ``chat``, message lists, or texts sent as one user message) -> padded ids, mask:
    on the left for a decoder, which appends after the last column; on the right for an encoder-decoder's
    encoder (BART's absolute positions count from the first column)."""
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
    return pad(rows, tokenizer.pad_token_id or 0, side=side)


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


def decode_new(tokenizer: Any, new: torch.Tensor, eos_ids: Sequence[int]) -> list[str]:
    """Each row's generated text: its tokens up to (not including) the first eos, special tokens skipped."""
    texts = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


@torch.inference_mode()
def seq2seq_records(
    model: TaskModel,
    tokenizer: Any,
    records: Iterable[dict[str, Any]],
    batch_size: int = 8,
    max_length: int | None = None,
    config: GenerationConfig | None = None,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, prediction) pairs of an encoder-decoder: {'generated': text} from each record's ``text``
    (greedy or beam search, per ``config``), plus {'nll', 'tokens'} of its ``text_pair`` when every
    record of the batch has one (what ``Seq2SeqHead.evaluate`` scores)."""
    config = config or GenerationConfig.for_model(model)
    device = next(model.parameters()).device
    model.eval()
    for chunk in batches(records, batch_size):
        batch = to_device(model.head.collate(chunk, tokenizer, max_length), device)
        scored: list[dict[str, Any]] = [{} for _ in chunk]
        if "labels" in batch:  # the targets' loss, by teacher forcing
            scored = model.head.postprocess(model(**batch).logits, batch)
        out = generate(model, batch["input_ids"], batch["attention_mask"], config)  # (B, 1 + new)
        texts = decode_new(tokenizer, out[:, 1:], config.eos_ids)
        yield from zip(
            chunk, ({"generated": t, **p} for t, p in zip(texts, scored, strict=True)), strict=True
        )
