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


def process(scores: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Every processor the config asks for, in transformers' order (penalty first, then the samplers')."""
    if config.repetition_penalty != 1.0:
        scores = penalize_repetition(scores, seen, config.repetition_penalty)
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
