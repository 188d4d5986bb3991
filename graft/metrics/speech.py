"""Word and character error rates of transcripts (chapter 9), as jiwer computes them.

Both are corpus-level: the Levenshtein edits (substitutions, deletions, insertions) of every
prediction against its reference, summed, over the reference's length summed; 0-1 (more than 1
when a prediction inserts more than the references hold). Words are split as jiwer's default
does: runs of two or more whitespace characters become one space, the ends are stripped, and the
text is split at spaces. Characters: the stripped text's characters, spaces included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from graft.errors import GraftError
from graft.metrics._common import check_pair

_SPACES = re.compile(r"\s\s+")


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (each edit costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def _words(text: str) -> list[str]:
    return [w for w in _SPACES.sub(" ", text).strip().split(" ") if w]


def _rate(predictions: Sequence[str], references: Sequence[str], split) -> float:
    if isinstance(predictions, str):  # one transcript, as jiwer takes it too
        predictions, references = [predictions], [references]
    check_pair(predictions, references)
    for name, texts in (("predictions", predictions), ("references", references)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise GraftError(f"{name}[{bad}] is {type(texts[bad]).__name__}, not text")
    edits = length = 0
    for prediction, reference in zip(predictions, references, strict=True):
        ref = split(reference)
        edits += edit_distance(split(prediction), ref)
        length += len(ref)
    return edits / max(length, 1)  # jiwer: empty references count the insertions


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate: word edits over reference words."""
    return _rate(predictions, references, _words)


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate: character edits over reference characters."""
    return _rate(predictions, references, lambda text: list(text.strip()))


_PUNCTUATION = re.compile(
    r"[^\w\s']|(?<!\w)'|'(?!\w)"
)  # all but letters, digits, spaces and inner apostrophes


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation out (apostrophes inside words kept), spaces collapsed: so that
    "The fox, jumps." and "the fox jumps" count as the same words."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())
