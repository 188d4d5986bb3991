"""In-context few-shot learning with a chat model (chapter 10): k examples per class in the prompt.

The examples are a conversation: each one a user turn (the instruction and the text) and the
assistant's answer (its label's verbalizer); the input to classify is the last user turn. The
answer is scored, not parsed: each verbalizer's log-likelihood as the assistant's reply
(graft.fewshot.verbalizer.continuation_scores), so every input gets a label and a distribution.

Examples are chosen per class, ``random`` (one seeded set for every input, its order shuffled so
that no class always comes last) or ``similar`` (for each input, the k nearest texts of each
class by a sentence encoder's cosine, as KATE, Liu et al. 2022; nearest last). With random
examples the scores are calibrated as in zero-shot (one content-free input per set of examples);
with similar ones each input has its own set, and calibrating would take three more prompts per
input, so they are not.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graft.errors import GraftError
from graft.fewshot.verbalizer import (
    CONTENT_FREE,
    calibrate,
    check_chat_template,
    clip_text,
    continuation_scores,
    token_ids,
)

SELECTIONS = ("random", "similar")
DEFAULT_INSTRUCTION = (
    "Classify the text into one of these categories: {labels}. Answer with the category only."
)


def by_class(labels: Sequence[str], classes: Sequence[str]) -> dict[str, list[int]]:
    """Indices of the examples of each class (in order); a class without examples is an error."""
    groups: dict[str, list[int]] = {c: [] for c in classes}
    for i, label in enumerate(labels):
        if label not in groups:
            raise GraftError(f"icl: example {i + 1} has label {label!r}, which is not one of --labels")
        groups[label].append(i)
    empty = [c for c, rows in groups.items() if not rows]
    if empty:
        raise GraftError(f"icl: no examples of class {empty[0]!r}")
    return groups


def random_examples(labels: Sequence[str], classes: Sequence[str], k: int, seed: int) -> list[int]:
    """k examples of each class (fewer if it has fewer), drawn with ``seed``, in a shuffled order."""
    rng = random.Random(seed)
    chosen = [i for rows in by_class(labels, classes).values() for i in rng.sample(rows, min(k, len(rows)))]
    rng.shuffle(chosen)
    return chosen


def similar_examples(
    queries: torch.Tensor, pool: torch.Tensor, labels: Sequence[str], classes: Sequence[str], k: int
) -> list[list[int]]:  # (N, P) unit queries, (M, P) unit pool
    """For each query, the k most similar examples of each class, least similar first (the nearest
    sits next to the query)."""
    groups = by_class(labels, classes)
    similarity = queries.float() @ pool.float().T  # (N, M)
    chosen: list[list[int]] = []
    for row in similarity:
        picks = []
        for rows in groups.values():
            top = row[rows].topk(min(k, len(rows))).indices.tolist()
            picks.extend(rows[t] for t in top)
        chosen.append(sorted(picks, key=lambda i: float(row[i])))
    return chosen


def conversation(instruction: str, examples: Sequence[tuple[str, str]], text: str) -> list[dict[str, str]]:
    """The chat messages: each example as a user turn and the assistant's answer, then ``text``."""
    messages = []
    for example, answer in examples:
        messages.append({"role": "user", "content": f"{instruction}\n\nText: {example}"})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"{instruction}\n\nText: {text}"})
    return messages


def icl_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    pool_texts: Sequence[str],
    pool_labels: Sequence[str],
    classes: Sequence[str],
    verbalizers: Sequence[str],
    k: int,
    select: str = "random",
    seed: int = 0,
    encode: Callable[[list[str]], torch.Tensor] | None = None,
    max_tokens: int | None = 64,
    instruction: str = DEFAULT_INSTRUCTION,
    batch_size: int = 4,
) -> torch.Tensor:  # -> (N, L)
    """(N, L) a chat model's scores of each class for each text, shown k examples per class from the
    pool (``pool_labels``: class names). ``encode`` (texts -> (M, P) unit vectors) picks ``similar``
    examples; texts in the prompt are cut to ``max_tokens`` tokens."""
    if select not in SELECTIONS:
        raise GraftError(f"icl: example selection {select!r} is not one of {', '.join(SELECTIONS)}")
    if k < 1:
        raise GraftError(f"icl: k must be at least 1 example per class, got {k}")
    check_chat_template(tokenizer, "icl")
    answers = dict(zip(classes, verbalizers, strict=True))
    rule = instruction.replace("{labels}", ", ".join(verbalizers))
    # the assistant's reply starts right after the generation prompt: no leading space
    continuations = [token_ids(tokenizer, v, special=False) for v in verbalizers]
    clipped = [clip_text(tokenizer, t, max_tokens) for t in pool_texts]
    queries = [clip_text(tokenizer, t, max_tokens) for t in texts]

    def prompt(examples: Sequence[int], text: str) -> list[int]:
        shown = [(clipped[i], answers[pool_labels[i]]) for i in examples]
        return tokenizer.apply_chat_template(
            conversation(rule, shown, text), add_generation_prompt=True, tokenize=True
        )

    pad_id = tokenizer.pad_token_id or 0
    if select == "similar":
        if encode is None:
            raise GraftError("icl: similar examples need a sentence encoder (--encoder MODEL)")
        per_query = similar_examples(encode(list(texts)), encode(list(pool_texts)), pool_labels, classes, k)
        prompts = [prompt(ex, q) for ex, q in zip(per_query, queries, strict=True)]
        return continuation_scores(model, prompts, continuations, batch_size, pad_id)
    examples = random_examples(pool_labels, classes, k, seed)
    scores = continuation_scores(
        model, [prompt(examples, q) for q in queries], continuations, batch_size, pad_id
    )
    free = continuation_scores(
        model, [prompt(examples, t) for t in CONTENT_FREE], continuations, batch_size, pad_id
    )
    return calibrate(scores, free)
