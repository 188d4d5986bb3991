"""Classification metrics with scikit-learn's semantics: accuracy, precision/recall/F1, confusion matrix.

Single-label inputs are 1-D sequences of class labels (ints or strings); multi-label inputs are
2-D 0/1 indicator arrays of shape (n_samples, n_classes), whose "labels" are column indices.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from graft.errors import GraftError
from graft.io.atomic import atomic_path
from graft.metrics._common import check_average, check_pair, prf, report


def _arrays(predictions: ArrayLike, references: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(predictions), np.asarray(references)
    check_pair(pred, ref)
    if pred.shape != ref.shape or pred.ndim > 2:
        raise GraftError(f"predictions has shape {pred.shape} but references has shape {ref.shape}")
    return pred, ref


def _sorted_labels(*arrays: np.ndarray) -> list:
    values = set()
    for a in arrays:
        values.update(a.tolist())
    try:
        return sorted(values)
    except TypeError:
        raise GraftError(f"labels mix types that cannot be sorted: {sorted(map(repr, values))}") from None


def _counts(pred: np.ndarray, ref: np.ndarray, labels: Sequence | None) -> tuple[list, np.ndarray, ...]:
    """Per-label true positives, predicted counts and true counts (the 'support')."""
    if pred.ndim == 2:  # multi-label indicators: one binary problem per column
        labels = list(range(pred.shape[1])) if labels is None else list(labels)
        p, r = pred[:, labels] == 1, ref[:, labels] == 1
        return labels, (p & r).sum(0), p.sum(0), r.sum(0)
    labels = _sorted_labels(pred, ref) if labels is None else list(labels)
    # a sample whose true class is outside `labels` still counts as a false positive for its prediction
    tp = np.array([np.sum((pred == c) & (ref == c)) for c in labels])
    pred_sum = np.array([np.sum(pred == c) for c in labels])
    true_sum = np.array([np.sum(ref == c) for c in labels])
    return labels, tp, pred_sum, true_sum


def accuracy(predictions: ArrayLike, references: ArrayLike) -> float:
    """Fraction of exact matches; for multi-label rows, the whole row must match (subset accuracy)."""
    pred, ref = _arrays(predictions, references)
    same = pred == ref
    return float((same.all(1) if same.ndim == 2 else same).mean())


def precision_recall_f1(
    predictions: ArrayLike,
    references: ArrayLike,
    *,
    average: str | None = "macro",
    labels: Sequence | None = None,
    pos_label=1,
    zero_division: float = 0.0,
) -> tuple:
    """Precision, recall and F1 as sklearn's precision_recall_fscore_support.

    average is 'macro', 'micro', 'weighted', 'binary' (the scores of `pos_label`) or None
    (three dicts label -> score). A 0/0 ratio gives `zero_division` (0, 1 or nan).
    """
    check_average(average, (None, "micro", "macro", "weighted", "binary"))
    pred, ref = _arrays(predictions, references)
    if average == "binary":
        present = _sorted_labels(pred, ref)
        if pred.ndim == 2 or len(present) > 2:
            raise GraftError(
                f"average='binary' needs two classes but found {present}; use 'macro' or 'micro'"
            )
        if len(present) == 2 and pos_label not in present:
            raise GraftError(f"pos_label={pos_label!r} is not one of the classes {present}")
        labels, average = [pos_label], "micro"
    labels, tp, pred_sum, true_sum = _counts(pred, ref, labels)
    scores = prf(tp, pred_sum, true_sum, average, zero_division)
    if average is None:
        return tuple({label: float(s) for label, s in zip(labels, score, strict=True)} for score in scores)
    return scores


def precision(predictions: ArrayLike, references: ArrayLike, **kwargs) -> float | dict:
    """Precision; keyword arguments as precision_recall_f1."""
    return precision_recall_f1(predictions, references, **kwargs)[0]


def recall(predictions: ArrayLike, references: ArrayLike, **kwargs) -> float | dict:
    """Recall; keyword arguments as precision_recall_f1."""
    return precision_recall_f1(predictions, references, **kwargs)[1]


def f1(predictions: ArrayLike, references: ArrayLike, **kwargs) -> float | dict:
    """F1; keyword arguments as precision_recall_f1."""
    return precision_recall_f1(predictions, references, **kwargs)[2]


def classification_report(
    predictions: ArrayLike,
    references: ArrayLike,
    *,
    labels: Sequence | None = None,
    zero_division: float = 0.0,
) -> dict:
    """{label: {precision, recall, f1, support}} plus 'micro avg', 'macro avg' and 'weighted avg' rows."""
    pred, ref = _arrays(predictions, references)
    return report(*_counts(pred, ref, labels), zero_division)


def confusion_matrix(
    predictions: ArrayLike,
    references: ArrayLike,
    *,
    labels: Sequence | None = None,
    normalize: str | None = None,
) -> np.ndarray:
    """Counts[i, j] of samples with true label labels[i] predicted as labels[j], as sklearn's.

    Samples whose true or predicted label is not in `labels` are left out. normalize='true',
    'pred' or 'all' divides by row sums, column sums or the total (0 where that sum is 0).
    """
    if normalize not in (None, "true", "pred", "all"):
        raise GraftError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    pred, ref = _arrays(predictions, references)
    if pred.ndim != 1:
        raise GraftError("confusion_matrix needs 1-D labels, got multi-label indicators")
    labels = _sorted_labels(pred, ref) if labels is None else list(labels)
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(ref.tolist(), pred.tolist(), strict=True):
        if t in index and p in index:
            cm[index[t], index[p]] += 1
    if normalize is None:
        return cm
    axis = {"true": 1, "pred": 0, "all": None}[normalize]
    total = cm.sum(axis=axis, keepdims=axis is not None)
    return np.divide(cm, total, out=np.zeros(cm.shape), where=total != 0)


def confusion_matrix_png(
    cm: ArrayLike, labels: Sequence, path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Draw `cm` (rows: true, columns: predicted) with its labels and write it to `path` atomically."""
    try:
        from matplotlib.figure import Figure  # optional dependency, only needed for plots
    except ImportError:
        raise GraftError("drawing a confusion matrix needs matplotlib: pip install matplotlib") from None
    cm = np.asarray(cm)
    if cm.shape != (len(labels), len(labels)):
        raise GraftError(f"confusion matrix has shape {cm.shape} but there are {len(labels)} labels")
    path = Path(path)
    if not path.parent.is_dir():
        raise GraftError(f"cannot write {path}: folder {path.parent} does not exist")
    size = 2 + 0.5 * len(labels)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), value in np.ndenumerate(cm):
        text = f"{value:d}" if np.issubdtype(cm.dtype, np.integer) else f"{value:.2f}"
        ax.text(j, i, text, ha="center", va="center", color="white" if value > threshold else "black")
    with atomic_path(path) as tmp:  # a reader never sees a half-written file
        fig.savefig(tmp, format="png", dpi=120)
    return path
