"""The decoding loop: greedy and sampling, streamed one step at a time.

A ``Decoder`` owns the cache and the attention mask of a batch: ``prefill`` runs the prompt
once, each ``step`` runs one new token per row. ``stream`` yields the tokens of every row as
they come; ``generate`` returns prompt + new tokens (through ``beam_search`` with num_beams > 1).
Prompts of different lengths are left-padded: position ids count from each row's first real
token, so padding changes nothing in the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from graft.errors import GraftError
from graft.generation.beam import beam_search
from graft.generation.config import GenerationConfig
from graft.generation.decoder import Decoder, StopStrings, fit_context, resolve, sampler, seen_tokens
from graft.generation.processors import process
from graft.tasks import TaskModel


@torch.inference_mode()
def stream(
    model: TaskModel,
    input_ids: torch.Tensor,  # (B, T), left-padded when rows differ in length
    attention_mask: torch.Tensor | None = None,  # (B, T)
    config: GenerationConfig | None = None,
    tokenizer=None,  # needed for stop_strings
    **changes: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time; finished rows get padding.

    Greedy, or sampling with ``do_sample``; for beam search use ``generate``.
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        raise GraftError("generation: beam search cannot stream; call generate()")
    if config.stop_strings and tokenizer is None:
        raise GraftError("generation: stop_strings need the tokenizer")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    input_ids, mask = fit_context(model, input_ids, mask, config)
    decoder = Decoder(model, input_ids, mask, config.max_new_tokens, config.compile)
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)
    pad = torch.tensor(config.pad_id, device=input_ids.device)
    generator = sampler(config, input_ids.device)
    seen = seen_tokens(input_ids, mask, model.config.vocab_size) if config.repetition_penalty != 1.0 else None
    stops = StopStrings(tokenizer, config.stop_strings, input_ids.shape[0]) if config.stop_strings else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    logits = decoder.prefill()
    for step in range(config.max_new_tokens):
        scores = process(logits, seen, config)
        if config.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            tokens = scores.argmax(-1)  # (B,)
        tokens = torch.where(done, pad, tokens)
        yield tokens
        if len(eos):
            done |= torch.isin(tokens, eos)
        if stops is not None:
            done |= stops(tokens, done)
        if step == config.max_new_tokens - 1 or bool(done.all()):
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = decoder.step(tokens)


def generate(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer=None,
    **changes: Any,
) -> torch.Tensor:
    """Prompt followed by the new tokens: (B, T + new). Greedy, sampling or beam search, per ``config``.

    Options can also be given as keywords (``generate(model, ids, max_new_tokens=32, do_sample=True)``).
    When the prompt had to be cut to fit the context window, the result starts with the kept part.
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, config)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    input_ids, mask = fit_context(model, input_ids, mask, config)
    steps = list(stream(model, input_ids, mask, config, tokenizer))
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def greedy(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt followed by up to max_new_tokens greedy tokens: (B, T + new)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return generate(model, input_ids, attention_mask, config)
