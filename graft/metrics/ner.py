"""Entity-level precision, recall and F1 for tagged sequences, as seqeval's default (conlleval) mode.

Tags are 'O' or a prefix B/I/E/S, optionally followed by '-TYPE' (IOB1, IOB2, IOE and IOBES all
work). An entity counts as correct only when its type, start and end all match.
"""

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from graft.errors import GraftError
from graft.metrics._common import check_average, check_pair, prf, report

_TAG = re.compile(r"O|[BIES](-.*)?")


def _split(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); untyped tags ('O', 'B') get seqeval's type '_'."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether an entity ended just before the current token (conlleval's rules)."""
    return prev_tag in "ES" or (prev_tag in "BI" and tag in "BSO") or (prev_tag != "O" and prev_type != type_)


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether an entity starts at the current token; an I- or E- after O or another entity starts one."""
    return tag in "BS" or (prev_tag in "ESO" and tag in "EI") or (tag != "O" and prev_type != type_)


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The (type, first, last) token spans of the entities in one tag sequence."""
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, label in enumerate([*tags, "O"]):  # the extra 'O' closes an entity at the end
        tag, type_ = _split(label)
        if _ends(prev_tag, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


def _check(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> None:
    check_pair(predictions, references)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(pred, str) or isinstance(ref, str):
            raise GraftError(f"predictions[{i}] and references[{i}] must be lists of tags, not strings")
        if len(pred) != len(ref):
            raise GraftError(f"predictions[{i}] has {len(pred)} tags but references[{i}] has {len(ref)}")
        for name, seq in (("predictions", pred), ("references", ref)):
            for j, tag in enumerate(seq):
                if not isinstance(tag, str) or not _TAG.fullmatch(tag):
                    raise GraftError(f"{name}[{i}][{j}] is {tag!r}; tags are 'O' or B-, I-, E-, S-<type>")


def _counts(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> tuple:
    """Entity types (sorted) with their true positive, predicted and true counts."""
    _check(predictions, references)
    found: dict[str, set] = defaultdict(set)
    gold: dict[str, set] = defaultdict(set)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        for type_, start, end in get_entities(pred):
            found[type_].add((i, start, end))
        for type_, start, end in get_entities(ref):
            gold[type_].add((i, start, end))
    types = sorted(found.keys() | gold.keys())
    tp = np.array([len(found[t] & gold[t]) for t in types])
    return types, tp, np.array([len(found[t]) for t in types]), np.array([len(gold[t]) for t in types])


def entity_precision_recall_f1(
    predictions: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    *,
    average: str | None = "micro",
    zero_division: float = 0.0,
) -> tuple:
    """Entity-level precision, recall and F1; average None gives three dicts type -> score.

    With no entity in either input, every average is `zero_division`.
    """
    check_average(average)
    types, tp, pred_sum, true_sum = _counts(predictions, references)
    if not types and average is not None:
        return (float(zero_division),) * 3
    scores = prf(tp, pred_sum, true_sum, average, zero_division)
    if average is None:
        return tuple({t: float(s) for t, s in zip(types, score, strict=True)} for score in scores)
    return scores


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], **kwargs) -> float:
    """Entity-level F1 (micro-averaged by default, the CoNLL number)."""
    return entity_precision_recall_f1(predictions, references, **kwargs)[2]


def entity_report(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], *, zero_division: float = 0.0
) -> dict:
    """{type: {precision, recall, f1, support}} plus 'micro avg', 'macro avg' and 'weighted avg' rows."""
    return report(*_counts(predictions, references), zero_division)


def token_accuracy(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Fraction of tokens whose tag is right (seqeval's accuracy_score)."""
    _check(predictions, references)
    pairs = [
        (p, r)
        for pred, ref in zip(predictions, references, strict=True)
        for p, r in zip(pred, ref, strict=True)
    ]
    return sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0
