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
from graft.generation.constrain import Constraint, Vocabulary
from graft.generation.decoder import (
    Decoder,
    EncoderDecoderState,
    StopStrings,
    resolve,
    sampler,
    seen_tokens,
    start,
)
from graft.generation.processors import process
from graft.tasks import TaskModel


@torch.inference_mode()
def stream(
    model: TaskModel,
    input_ids: torch.Tensor | None,  # (B, T), left-padded when rows differ in length
    attention_mask: torch.Tensor | None = None,  # (B, T)
    config: GenerationConfig | None = None,
    tokenizer=None,  # needed for stop_strings
    decoder_input_ids: torch.Tensor | None = None,  # (B, T') an encoder-decoder's forced first tokens
    input_features: torch.Tensor | None = None,  # (B, mel bins, frames) for an audio encoder
    **changes: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time; finished rows get padding.

    Greedy, or sampling with ``do_sample``; for beam search use ``generate``. An encoder-decoder
    (T5, BART) reads ``input_ids`` with its encoder, once, and decodes from its start token or
    from ``decoder_input_ids``.
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        raise GraftError("generation: beam search cannot stream; call generate()")
    decoder, prompt = start(model, input_ids, attention_mask, config, decoder_input_ids, input_features)
    yield from run(model, decoder, prompt, config, tokenizer)


def run(
    model: TaskModel,
    decoder: Decoder | EncoderDecoderState,
    prompt: torch.Tensor,  # (B, T) what the decoder starts from
    config: GenerationConfig,
    tokenizer=None,
) -> Iterator[torch.Tensor]:
    """Greedy or sampling steps from a started decoder (``stream``'s loop)."""
    if config.stop_strings and tokenizer is None:
        raise GraftError("generation: stop_strings need the tokenizer")
    device = prompt.device
    mask = decoder.mask[:, : prompt.shape[1]] if isinstance(decoder, Decoder) else None
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
    pad = torch.tensor(config.pad_id, device=device)
    generator = sampler(config, device)
    seen = seen_tokens(prompt, mask, model.config.vocab_size) if config.repetition_penalty != 1.0 else None
    stops = StopStrings(tokenizer, config.stop_strings, prompt.shape[0]) if config.stop_strings else None
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    sequence = prompt  # (B, T + step): what n-gram blocking, OpenAI's penalties and forced tokens look at
    constraint = None
    if config.constrained:
        if tokenizer is None:
            raise GraftError("generation: json_schema, regex and grammar need the tokenizer")
        vocabulary = Vocabulary.of(tokenizer, model.config.vocab_size, config.eos_ids)
        constraint = Constraint(vocabulary, config, prompt.shape[0])

    logits = decoder.prefill()
    for step in range(config.max_new_tokens):
        allowed = constraint.allowed() if constraint is not None else None
        scores = process(logits, seen, config, sequence, step, allowed)
        if config.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            tokens = scores.argmax(-1)  # (B,)
        tokens = torch.where(done, pad, tokens)
        yield tokens
        if constraint is not None:
            constraint.advance(tokens.tolist(), (~done).nonzero()[:, 0].tolist())
        if len(eos):
            done |= torch.isin(tokens, eos)
        if stops is not None:
            done |= stops(tokens, done)
        if step == config.max_new_tokens - 1 or bool(done.all()):
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if config.no_repeat_ngram_size or config.presence_penalty or config.frequency_penalty:
            sequence = torch.cat([sequence, tokens[:, None]], dim=1)
        logits = decoder.step(tokens)


def generate(
    model: TaskModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer=None,
    decoder_input_ids: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    **changes: Any,
) -> torch.Tensor:
    """Prompt followed by the new tokens: (B, T + new). Greedy, sampling or beam search, per ``config``.

    Options can also be given as keywords (``generate(model, ids, max_new_tokens=32, do_sample=True)``).
    When the prompt had to be cut to fit the context window, the result starts with the kept part.
    An encoder-decoder's result is the decoder's: its start tokens, then the new ones (as
    transformers' generate).
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, config, decoder_input_ids, input_features)
    with torch.inference_mode():
        decoder, prompt = start(model, input_ids, attention_mask, config, decoder_input_ids, input_features)
        steps = list(run(model, decoder, prompt, config, tokenizer))
        return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)


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
