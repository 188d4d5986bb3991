"""SQuAD exact match and F1, as the official v1.1 and v2.0 evaluation scripts (scores 0-100).

An example with no gold answer (an empty list, or only empty strings) is unanswerable: the
prediction scores 100 when it is empty too, else 0, as in SQuAD v2.0. Otherwise the best score over the
gold answers counts, and the v1.1 and v2.0 scripts agree (v2.0 drops gold answers that
normalize to an empty string; so do we).
"""

import re
import string
from collections import Counter
from collections.abc import Sequence

from graft.errors import GraftError
from graft.metrics._common import check_pair

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, and collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # no-answer: right only if both are empty
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    return [a for a in answers if normalize_answer(a)] or [""]  # no real answer: the gold is ''


def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals some normalized gold answer, else 0.0."""
    return max(_exact(prediction, gold) for gold in _golds(answers))


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 of the prediction against the gold answers."""
    return max(_f1(prediction, gold) for gold in _golds(answers))


def squad(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{'exact_match', 'f1'} averaged over examples, on the official scripts' 0-100 scale.

    references[i] is the list of gold answers of example i (a single string is allowed).
    """
    check_pair(predictions, references)
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise GraftError(f"predictions[{i}] is {type(prediction).__name__}; expected the answer text")
    n = len(predictions)
    return {
        "exact_match": 100.0 * sum(map(squad_exact_match, predictions, references)) / n,
        "f1": 100.0 * sum(map(squad_f1, predictions, references)) / n,
    }
