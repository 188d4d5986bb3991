"""Dynamic masking for masked language modelling (BERT's recipe, chapter 4).

Each batch draws its own masks (dynamic masking, as RoBERTa showed works better than masks fixed
once): ``probability`` of the tokens (or, with whole-word masking, of the words) are chosen; of the
chosen tokens 80% become [MASK], 10% a random token and 10% stay as they are, and only they are in
the loss. Special tokens and padding are never chosen. Draws come from a ``torch.Generator`` the
caller owns, so a seed gives the same masks on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.errors import GraftError

IGNORE = -100  # label of the tokens that are not in the loss
MASKED, RANDOM = 0.8, 0.1  # of the chosen tokens: [MASK], a random token; the rest are kept


def words_from_pieces(pieces: Sequence[str], special: Sequence[bool]) -> list[int | None]:
    """Word index of each WordPiece token (a "##" piece continues the word before it); None for specials.

    For token ids that come without the tokenizer's word ids (pre-tokenized or streamed text).
    """
    words: list[int | None] = []
    word = -1
    for piece, is_special in zip(pieces, special, strict=True):
        if is_special:
            words.append(None)
            continue
        if not (piece.startswith("##") and word >= 0):
            word += 1
        words.append(word)
    return words


def word_tensor(word_ids: Sequence[Sequence[int | None]], width: int) -> torch.Tensor:
    """(B, T) word index per token, -1 for specials and padding, from the tokenizer's word ids."""
    words = torch.full((len(word_ids), width), -1, dtype=torch.long)
    for i, row in enumerate(word_ids):
        values = [-1 if w is None else w for w in row[:width]]
        words[i, : len(values)] = torch.tensor(values, dtype=torch.long)
    return words


def check_probability(probability: float) -> float:
    if not 0 < probability < 1:
        raise GraftError(f"masking: probability must be between 0 and 1 (exclusive), found {probability}")
    return probability


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    words: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (B, T): ``ids`` with the chosen tokens masked, and their original ids as
    labels (-100 elsewhere).

    ``maskable`` (B, T) bool: False for special tokens and padding. ``words`` (B, T): the word index of
    each token (-1 where none): then whole words are chosen, every piece of a chosen word at once.
    """
    check_probability(probability)
    if words is None:
        chosen = torch.rand(ids.shape, generator=generator) < probability  # (B, T)
    else:
        # one draw per (row, word): a token is chosen when its word is
        per_word = (
            torch.rand(ids.shape[0], int(words.max()) + 2, generator=generator) < probability
        )  # (B, W+1)
        chosen = per_word.gather(1, words.clamp(min=0))  # (B, T)
    chosen &= maskable
    labels = ids.masked_fill(~chosen, IGNORE)
    how = torch.rand(ids.shape, generator=generator)  # (B, T): 80/10/10 decided per token
    inputs = ids.clone()
    inputs[chosen & (how < MASKED)] = mask_token_id
    swap = chosen & (how >= MASKED) & (how < MASKED + RANDOM)
    inputs[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return inputs, labels
