"""Regression metrics: MSE, RMSE, MAE (as scikit-learn) and Pearson, Spearman correlation (as scipy)."""

import numpy as np
from numpy.typing import ArrayLike

from graft.errors import GraftError
from graft.metrics._common import check_pair


def _arrays(predictions: ArrayLike, references: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    check_pair(pred, ref)
    if pred.shape != ref.shape:
        raise GraftError(f"predictions has shape {pred.shape} but references has shape {ref.shape}")
    return pred.ravel(), ref.ravel()


def mse(predictions: ArrayLike, references: ArrayLike) -> float:
    """Mean squared error."""
    pred, ref = _arrays(predictions, references)
    return float(np.mean((pred - ref) ** 2))


def rmse(predictions: ArrayLike, references: ArrayLike) -> float:
    """Root mean squared error."""
    return float(np.sqrt(mse(predictions, references)))


def mae(predictions: ArrayLike, references: ArrayLike) -> float:
    """Mean absolute error."""
    pred, ref = _arrays(predictions, references)
    return float(np.mean(np.abs(pred - ref)))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        raise GraftError(f"a correlation needs at least 2 items, got {len(x)}")
    x, y = x - x.mean(), y - y.mean()
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    if norm == 0:  # a constant input has no correlation; scipy returns nan too
        return float("nan")
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def rank(values: ArrayLike) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    is_new = np.r_[True, ordered[1:] != ordered[:-1]]  # True where a new tie group starts
    starts = np.flatnonzero(is_new)
    ends = np.r_[starts[1:], len(values)]
    group = np.cumsum(is_new) - 1
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2)[group]  # mean of ranks start+1 .. end
    return ranks


def pearson(predictions: ArrayLike, references: ArrayLike) -> float:
    """Pearson correlation coefficient (nan when an input is constant)."""
    return _pearson(*_arrays(predictions, references))


def spearman(predictions: ArrayLike, references: ArrayLike) -> float:
    """Spearman rank correlation: Pearson on average ranks (nan when an input is constant)."""
    pred, ref = _arrays(predictions, references)
    return _pearson(rank(pred), rank(ref))
