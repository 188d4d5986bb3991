"""Evaluation metrics, implemented in numpy and Python and tested against the reference packages.

Scales follow the reference each metric is known by: classification, NER, ROUGE and correlations
in 0-1 (scikit-learn, seqeval, rouge_score, scipy), WER and CER too (jiwer); SQuAD EM/F1, BLEU and chrF in 0-100 (the
official SQuAD scripts, sacrebleu). Every function takes (predictions, references) except
perplexity, which takes negative log-likelihoods.
"""

from collections.abc import Callable

import numpy as np

from graft.errors import GraftError, did_you_mean
from graft.metrics.classification import (
    accuracy,
    classification_report,
    confusion_matrix,
    confusion_matrix_png,
    f1,
    precision,
    precision_recall_f1,
    recall,
)
from graft.metrics.language import perplexity
from graft.metrics.ner import (
    entity_f1,
    entity_precision_recall_f1,
    entity_report,
    get_entities,
    token_accuracy,
)
from graft.metrics.porter import porter_stem
from graft.metrics.qa import normalize_answer, squad, squad_exact_match, squad_f1
from graft.metrics.regression import mae, mse, pearson, rank, rmse, spearman
from graft.metrics.speech import cer, edit_distance, normalize_transcript, wer
from graft.metrics.text import bleu, chrf, rouge, rouge_tokenize, tokenize_13a

METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "classification_report": classification_report,
    "confusion_matrix": confusion_matrix,
    "entity_f1": entity_f1,
    "entity_report": entity_report,
    "token_accuracy": token_accuracy,
    "squad": squad,
    "rouge": rouge,
    "bleu": bleu,
    "chrf": chrf,
    "perplexity": perplexity,
    "mse": mse,
    "rmse": rmse,
    "mae": mae,
    "pearson": pearson,
    "spearman": spearman,
    "wer": wer,
    "cer": cer,
}


def _classification(predictions, references) -> dict[str, float]:
    p, r, f = precision_recall_f1(predictions, references, average="macro")
    return {
        "accuracy": accuracy(predictions, references),
        "precision_macro": p,
        "recall_macro": r,
        "f1_macro": f,
        "f1_micro": f1(predictions, references, average="micro"),
        "f1_weighted": f1(predictions, references, average="weighted"),
    }


def _multilabel(predictions, references) -> dict[str, float]:
    p, r, f = precision_recall_f1(predictions, references, average="micro")
    return {
        "accuracy": accuracy(predictions, references),  # subset accuracy: every label of a row right
        "precision_micro": p,
        "recall_micro": r,
        "f1_micro": f,
        "f1_macro": f1(predictions, references, average="macro"),
    }


def _regression(predictions, references) -> dict[str, float]:
    return {
        name: METRICS[name](predictions, references) for name in ("mse", "rmse", "mae", "pearson", "spearman")
    }


def _ner(predictions, references) -> dict[str, float]:
    p, r, f = entity_precision_recall_f1(predictions, references)
    return {"precision": p, "recall": r, "f1": f, "accuracy": token_accuracy(predictions, references)}


def _lm(predictions, references=None) -> dict[str, float]:
    # predictions: per-token negative log-likelihoods (or their mean); there are no references
    ppl = perplexity(predictions)  # validates the values first
    return {"loss": float(np.mean(predictions)), "perplexity": ppl}


def _seq2seq(predictions, references) -> dict[str, float]:
    # stemmed ROUGE, as the usual summarization scripts report it
    return {
        "bleu": bleu(predictions, references),
        "chrf": chrf(predictions, references),
        **rouge(predictions, references, use_stemmer=True),
    }


def _speech(predictions, references) -> dict[str, float]:
    # as written (jiwer's default), and case and punctuation aside (what speech papers report)
    plain = [normalize_transcript(t) for t in predictions], [normalize_transcript(t) for t in references]
    return {
        "wer": wer(predictions, references),
        "cer": cer(predictions, references),
        "wer_normalized": wer(*plain),
        "cer_normalized": cer(*plain),
    }


TASK_METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "classification": _classification,
    "multilabel": _multilabel,
    "regression": _regression,
    "ner": _ner,
    "qa": squad,
    "lm": _lm,
    "seq2seq": _seq2seq,
    "speech": _speech,
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        hint = did_you_mean(name, table) or f"; choose from {', '.join(table)}"
        raise GraftError(f"unknown {what} {name!r}{hint}")
    return table[name]


def get_metric(name: str) -> Callable:
    """The metric function registered under `name`."""
    return _lookup(METRICS, name, "metric")


def compute_metrics(kind: str, predictions, references=None) -> dict[str, float]:
    """The standard metrics of a task kind as a flat {name: float} dict.

    kind is one of TASK_METRICS: classification, multilabel, regression, ner, qa, lm (predictions
    are per-token negative log-likelihoods, no references), seq2seq or speech (WER and CER).
    """
    task = _lookup(TASK_METRICS, kind, "task kind")
    if kind != "lm" and references is None:
        raise GraftError(f"task kind {kind!r} needs references")
    return task(predictions, references)


__all__ = [
    "METRICS",
    "TASK_METRICS",
    "accuracy",
    "bleu",
    "chrf",
    "cer",
    "classification_report",
    "compute_metrics",
    "confusion_matrix",
    "confusion_matrix_png",
    "edit_distance",
    "entity_f1",
    "entity_precision_recall_f1",
    "entity_report",
    "f1",
    "get_entities",
    "get_metric",
    "mae",
    "mse",
    "normalize_answer",
    "normalize_transcript",
    "pearson",
    "perplexity",
    "porter_stem",
    "precision",
    "precision_recall_f1",
    "rank",
    "recall",
    "rmse",
    "rouge",
    "rouge_tokenize",
    "spearman",
    "squad",
    "squad_exact_match",
    "squad_f1",
    "token_accuracy",
    "tokenize_13a",
    "wer",
]
