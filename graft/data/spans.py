"""T5's span corruption (chapter 4): drop random spans of a text, name each by a sentinel, predict them.

As transformers' run_t5_mlm_flax.py does it: each row of ``tokens_length`` tokens is split into
alternating kept and noise spans (``noise_density`` of the tokens in spans of ``mean_span_length``
on average, the row starting with a kept span); the input keeps the kept tokens and puts one
sentinel where each noise span was, the target is every sentinel followed by the span it hides,
and both end with eos. Sentinels count down from the tokenizer's last id (<extra_id_0> is
``len(tokenizer) - 1``). Draws come from a ``torch.Generator`` the caller owns.
"""

from __future__ import annotations

import torch

from graft.errors import GraftError


def span_lengths(noise_density: float, mean_span_length: float, tokens_length: int) -> tuple[int, int, int]:
    """(noise tokens, noise spans, kept tokens) of a row of ``tokens_length`` tokens."""
    noise = round(tokens_length * noise_density)
    return noise, round(noise / mean_span_length), tokens_length - noise


def input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """(tokens per row before corruption, target length): the longest row whose corrupted input
    (kept tokens, a sentinel per span, eos) fits ``inputs_length``."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans, kept = span_lengths(noise_density, mean_span_length, tokens)
        return kept + spans + 1, noise + spans + 1

    tokens = inputs_length
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets = lengths(tokens)
    if (
        noise_density == 0.5 and targets > inputs
    ):  # as the reference does: the target no longer than the input
        tokens, targets = tokens - 1, targets - 1
    return tokens, targets


def segments(items: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) random positive lengths that sum to ``items``."""
    starts = torch.arange(items - 1) < count - 1  # (items - 1,): a segment starts after these
    starts = starts[torch.randperm(items - 1, generator=generator)]
    segment = torch.cat([torch.zeros(1, dtype=torch.long), starts.long()]).cumsum(0)  # (items,)
    return torch.bincount(segment, minlength=count)


def noise_mask(
    length: int, noise_density: float, mean_span_length: float, generator: torch.Generator
) -> torch.Tensor:
    """(length,) bool: True on the tokens of the noise spans."""
    noise = min(max(span_lengths(noise_density, mean_span_length, length)[0], 1), length - 1)
    spans = max(round(min(noise, length - noise) / mean_span_length), 1)
    kept_lengths = segments(length - noise, spans, generator)
    noise_lengths = segments(noise, spans, generator)
    interleaved = torch.stack([kept_lengths, noise_lengths], 1).reshape(-1)  # (2 spans,): kept, noise, ...
    starts = interleaved.cumsum(0)[:-1]
    indicator = torch.zeros(length, dtype=torch.long)
    indicator[starts] = 1
    return indicator.cumsum(0) % 2 == 1


def sentinel_ids(mask: torch.Tensor, last_id: int) -> torch.Tensor:
    """(B, L) long from a (B, L) bool mask: the span's sentinel on its first token (``last_id``, then
    one less for each next span), -1 on its other tokens, 0 outside spans."""
    m = mask.long()
    start = m - m.roll(1, -1) * m
    start[:, 0] = m[:, 0]
    ids = torch.where(start != 0, start.cumsum(-1), start)
    ids = torch.where(ids != 0, last_id + 1 - ids, 0)
    return ids - (m - start)


def keep_with_sentinels(ids: torch.Tensor, sentinels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) ids -> (B, L') : a span's first token becomes its sentinel, its other tokens go; + eos."""
    full = torch.where(sentinels != 0, sentinels, ids)
    kept = full[full >= 0].reshape(ids.shape[0], -1)
    return torch.cat([kept, torch.full((ids.shape[0], 1), eos_id, dtype=ids.dtype)], 1)


def corrupt_spans(
    ids: torch.Tensor,
    last_id: int,
    eos_id: int,
    generator: torch.Generator,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from (B, L) rows of token ids: each row corrupted with its own spans."""
    if ids.shape[1] < 2:
        raise GraftError(f"span corruption: a row needs at least 2 tokens, found {ids.shape[1]}")
    mask = torch.stack(
        [noise_mask(ids.shape[1], noise_density, mean_span_length, generator) for _ in range(ids.shape[0])]
    )  # (B, L)
    inputs = keep_with_sentinels(ids, sentinel_ids(mask, last_id), eos_id)
    targets = keep_with_sentinels(ids, sentinel_ids(~mask, last_id), eos_id)
    return inputs, targets
