"""Logits processors: (N, V) float32 scores -> scores. ``seen`` (N, V) marks tokens already in a row.

Written once, in ``process``, they serve sampling and beam search alike.
"""

from __future__ import annotations

import torch

from graft.generation.config import GenerationConfig


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: seen tokens' positive scores are divided by ``penalty``, negative ones multiplied."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def penalize_presence_and_frequency(
    scores: torch.Tensor, new: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties over the ``new`` (N, S) tokens generated so far: ``presence`` off each
    token that appeared, ``frequency`` times its count."""
    counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))  # (N, V)
    return scores - presence * (counts > 0) - frequency * counts


def bias(scores: torch.Tensor, logit_bias: dict[int, float]) -> torch.Tensor:
    """Add each token's bias to its score (-100 all but bans it, 100 all but forces it)."""
    ids = torch.tensor(list(logit_bias), device=scores.device)
    values = torch.tensor(list(logit_bias.values()), dtype=scores.dtype, device=scores.device)
    return scores.index_add(1, ids, values[None].expand(scores.shape[0], -1))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k best tokens."""
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[:, -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probabilities sum to at least p (nucleus sampling)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)  # (N, V), ascending
    remove = cumulative <= 1 - p
    remove[:, -1] = False  # always keep the best token
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least min_p times as probable as the best one."""
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    remove.scatter_(1, probs.argmax(-1, keepdim=True), False)
    return scores.masked_fill(remove, -float("inf"))


def no_repeat_ngram(scores: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Ban each token that would repeat an n-gram already in the row's sequence ``tokens`` (N, L)."""
    if tokens.shape[1] < n:
        return scores
    grams = tokens.unfold(1, n, 1)  # (N, L - n + 1, n)
    prefix = tokens[:, tokens.shape[1] - n + 1 :]  # (N, n - 1): what the next token would complete
    match = (grams[:, :, :-1] == prefix[:, None]).all(-1)  # (N, L - n + 1)
    banned = torch.zeros_like(scores, dtype=torch.long).scatter_add_(1, grams[:, :, -1], match.long())
    return scores.masked_fill(banned > 0, -float("inf"))


def force(scores: torch.Tensor, tokens: int | list[int]) -> torch.Tensor:
    """Only ``tokens`` may come next (score 0, every other -inf)."""
    ids = torch.tensor([tokens] if isinstance(tokens, int) else tokens, device=scores.device)
    forced = torch.full_like(scores, -float("inf"))
    forced[:, ids] = 0
    return forced


def process(
    scores: torch.Tensor,
    seen: torch.Tensor | None,
    config: GenerationConfig,
    tokens: torch.Tensor
    | None = None,  # (N, L) each row's sequence so far (prompt + new): n-grams, penalties
    step: int = 0,  # new tokens so far
    allowed: torch.Tensor | None = None,  # (N, V) the tokens a constraint allows (graft.generation.constrain)
) -> torch.Tensor:
    """Every processor the config asks for, in transformers' order (penalty, n-grams, length, forced
    tokens, then the samplers'), OpenAI's penalties and logit bias after the repetition penalty; a
    constraint's mask before the samplers' filters (vLLM's order), which then choose among the
    tokens it allows."""
    if config.repetition_penalty != 1.0:
        scores = penalize_repetition(scores, seen, config.repetition_penalty)
    if (config.presence_penalty or config.frequency_penalty) and step:
        new = tokens[:, tokens.shape[1] - step :]  # (N, step) the tokens generated so far
        scores = penalize_presence_and_frequency(
            scores, new, config.presence_penalty, config.frequency_penalty
        )
    if config.logit_bias:
        scores = bias(scores, config.logit_bias)
    if config.no_repeat_ngram_size:
        scores = no_repeat_ngram(scores, tokens, config.no_repeat_ngram_size)
    if step < config.min_new_tokens and config.eos_ids:
        scores = scores.index_fill(1, torch.tensor(config.eos_ids, device=scores.device), -float("inf"))
    if config.forced_bos_token_id is not None and step == 0 and tokens is not None and tokens.shape[1] == 1:
        scores = force(scores, config.forced_bos_token_id)  # the first token after the decoder start
    if config.forced_eos_token_id is not None and step == config.max_new_tokens - 1:
        scores = force(scores, config.forced_eos_token_id)  # the last one
    if config.suppress_tokens:
        scores = scores.index_fill(
            1, torch.tensor(config.suppress_tokens, device=scores.device), -float("inf")
        )
    if config.begin_suppress_tokens and step == 0:
        scores = scores.index_fill(
            1, torch.tensor(config.begin_suppress_tokens, device=scores.device), -float("inf")
        )
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to(scores.device), -float("inf"))
    if config.do_sample:
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k:
            scores = top_k_filter(scores, config.top_k)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p)
        if config.min_p:
            scores = min_p_filter(scores, config.min_p)
    return scores
