"""Helpers shared by the metric modules: input checks and precision/recall/F counting."""

from collections.abc import Sequence

import numpy as np

from graft.errors import GraftError

AVERAGES = (None, "micro", "macro", "weighted")


def check_pair(predictions: Sequence, references: Sequence) -> None:
    """Raise a GraftError unless predictions and references are non-empty and equally long."""
    if len(predictions) != len(references):
        raise GraftError(f"predictions has {len(predictions)} items but references has {len(references)}")
    if len(predictions) == 0:
        raise GraftError("predictions and references are empty")


def check_average(average: str | None, allowed: tuple = AVERAGES) -> None:
    if average not in allowed:
        raise GraftError(f"average must be one of {', '.join(map(str, allowed))}, got {average!r}")


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    # sklearn's rule: a 0/0 ratio becomes `zero_division` instead of nan
    out = np.full(num.shape, float(zero_division))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanaverage(values: np.ndarray, weights: np.ndarray | None) -> float:
    # sklearn ignores nan entries (zero_division=nan) and falls back to a plain mean when all weights are 0
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    if weights is None or weights[keep].sum() == 0:
        return float(values[keep].mean())
    return float(np.average(values[keep], weights=weights[keep]))


def prf(
    tp: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray, average: str | None, zero_division: float
) -> tuple:
    """Precision, recall and F1 from per-class counts; arrays when average is None, floats otherwise."""
    tp, pred_sum, true_sum = (np.asarray(x, dtype=np.float64) for x in (tp, pred_sum, true_sum))
    if average == "micro":
        tp, pred_sum, true_sum = (np.array([x.sum()]) for x in (tp, pred_sum, true_sum))
    precision = _divide(tp, pred_sum, zero_division)
    recall = _divide(tp, true_sum, zero_division)
    f1 = _divide(2 * tp, true_sum + pred_sum, zero_division)  # = 2PR/(P+R), defined when P+R is not
    if average is None:
        return precision, recall, f1
    weights = true_sum if average == "weighted" else None
    return tuple(_nanaverage(x, weights) for x in (precision, recall, f1))


def report(
    labels: list, tp: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray, zero_division: float
) -> dict:
    """Per-label and averaged {precision, recall, f1, support}, like sklearn's and seqeval's reports."""
    out = {}
    for label, p, r, f, s in zip(
        labels, *prf(tp, pred_sum, true_sum, None, zero_division), true_sum, strict=True
    ):
        out[label] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
    for average in ("micro", "macro", "weighted"):
        p, r, f = prf(tp, pred_sum, true_sum, average, zero_division)
        out[f"{average} avg"] = {"precision": p, "recall": r, "f1": f, "support": int(np.sum(true_sum))}
    return out
