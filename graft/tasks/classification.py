"""Sequence classification (chapter 5): one label, several labels (sigmoid) or a number per text.

The same head sits on every family; hf_layout says which vector it reads ([CLS], the pooler,
the last real token for decoders) and how its layers are named in each HF class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.data.records import label_error
from graft.errors import GraftError
from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, has_all, model_inputs, where, window
from graft.tasks.hf_layout import hf_head
from graft.tasks.pooling import POOLINGS, new_linear, pool, pooled_rows, set_pooler

# graft's short names <-> config.json "problem_type" (transformers' names)
PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def labels_list(id2label: Any) -> list[str]:
    """id2label as a list: from a list, or a {id: label} dict with int or string keys."""
    if isinstance(id2label, dict):
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [str(label) for label in id2label]


class ClassificationHead(Head):
    """pool -> [dropout -> dense -> activation] -> dropout -> out: (B, num_labels) logits."""

    task = "classification"

    def __init__(
        self,
        body: Transformer,
        num_labels: int | None = None,
        id2label: list[str] | dict | None = None,
        problem_type: str = "single_label",
        pooling: str | None = None,
        dropout: float | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        cfg = body.config
        problem_type = next((k for k, v in PROBLEM_TYPES.items() if problem_type in (k, v)), problem_type)
        if problem_type not in PROBLEM_TYPES:
            raise GraftError(
                f"classification: problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}"
            )
        if id2label is not None:
            self.id2label = labels_list(id2label)
            if num_labels is not None and num_labels != len(self.id2label):
                raise GraftError(
                    f"classification: num_labels={num_labels} but id2label has {len(self.id2label)}"
                )
        else:
            num_labels = num_labels or (1 if problem_type == "regression" else 2)
            self.id2label = [f"LABEL_{i}" for i in range(num_labels)]
        self.problem_type = problem_type
        self.threshold = threshold  # multi-label: a label is predicted when its sigmoid exceeds this
        self.spec = hf_head(cfg, self.task)
        self.pooling = pooling or self.spec.pooling
        if self.pooling not in POOLINGS:
            raise GraftError(f"classification: pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        self.config = cfg
        self.reads_pooler = self.pooling == "pooler"
        if self.reads_pooler:
            set_pooler(body, True)  # a checkpoint saved without one gets a new pooler
        std = cfg.hf_config.get("initializer_range", 0.02)
        h = cfg.hidden_size
        self.dense = new_linear(h, h, std=std) if self.spec.dense else None
        self.act = ACTIVATIONS[self.spec.activation]() if self.spec.dense else None
        self.drop = nn.Dropout(self.spec.dropout_rate(cfg.hf_config) if dropout is None else dropout)
        self.out = new_linear(h, len(self.id2label), bias=self.spec.bias, std=std)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def rows(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return pooled_rows(self.pooling, batch, self.config)

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        x = pool(self.pooling, out, batch, self.config)  # (B, H)
        if self.dense is not None:
            if self.spec.dropout_first:
                x = self.drop(x)
            x = self.act(self.dense(x))
        return self.out(self.drop(x))  # (B, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        logits = logits.float()
        if self.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1) if self.num_labels == 1 else logits, labels.float())
        if self.problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels.float())  # mean per example, then over B
        return F.cross_entropy(logits, labels)

    # ---- Hugging Face task checkpoints ----
    def hf_names(self) -> dict[str, str]:
        return self.spec.names()

    def hf_config(self) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "id2label": {str(i): label for i, label in enumerate(self.id2label)},
            "label2id": {label: i for i, label in enumerate(self.id2label)},
            "problem_type": PROBLEM_TYPES[self.problem_type],
        }
        if self.pooling != self.spec.pooling:  # graft only: transformers pools its own way
            hf["graft_pooling"] = self.pooling
        cfg = self.config
        if self.pooling == "last" and cfg.pad_token_id is None and cfg.eos_token_id is not None:
            # transformers finds the last token by the pad id; graft's tokenizer pads decoders with eos
            eos = cfg.eos_token_id
            hf["pad_token_id"] = eos if isinstance(eos, int) else eos[0]
        return hf

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if hf.get("id2label"):
            options["id2label"] = labels_list(hf["id2label"])
        if hf.get("problem_type"):
            options["problem_type"] = hf["problem_type"]
        elif hf.get("id2label") and len(hf["id2label"]) == 1:
            options["problem_type"] = "regression"  # transformers' rule for one output
        if hf.get("graft_pooling"):
            options["pooling"] = hf["graft_pooling"]
        return options

    # ---- records in, predictions out ----
    def encode_label(self, label: Any, record: dict[str, Any], index: int) -> Any:
        if self.problem_type == "regression":
            values = label if isinstance(label, list) else [label]
            try:
                return [float(v) for v in values]
            except (TypeError, ValueError):
                raise GraftError(f"{where(record, index)}: label {label!r} is not a number") from None
        label2id = {name: i for i, name in enumerate(self.id2label)}
        names = label if isinstance(label, list) else [label]
        unknown = [str(n) for n in names if str(n) not in label2id]
        if unknown:
            raise label_error(
                "unknown label",
                where(record, index),
                unknown[0],
                self.id2label,
                "is not one of the model's labels",
            )
        if self.problem_type == "multi_label":
            row = [0.0] * self.num_labels
            for name in names:
                row[label2id[str(name)]] = 1.0
            return row
        if isinstance(label, list):
            raise GraftError(f"{where(record, index)}: a list of labels, but the model is single-label")
        return label2id[str(label)]

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        texts = field(records, "text", self.task)
        pairs = field(records, "text_pair", self.task) if any(r.get("text_pair") for r in records) else None
        enc = tokenizer.encode(texts, pairs, max_length=window(self.config, tokenizer, max_length))
        batch: dict[str, Any] = model_inputs(enc, self.config)
        if has_all(records, "label"):
            labels = [self.encode_label(r["label"], r, i) for i, r in enumerate(records)]
            dtype = torch.long if self.problem_type == "single_label" else torch.float
            batch["labels"] = torch.tensor(labels, dtype=dtype)
            if self.problem_type == "regression" and self.num_labels == 1:
                batch["labels"] = batch["labels"].squeeze(-1)
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'label', 'score', 'scores'} per text; multi-label: {'labels', 'scores'}; regression: {'value'}."""
        logits = logits.detach().float().cpu()  # (B, C)
        if self.problem_type == "regression":
            return [
                {"value": row[0].item()} if self.num_labels == 1 else {"value": row.tolist()}
                for row in logits
            ]
        if self.problem_type == "multi_label":
            threshold = options.get("threshold", self.threshold)
            probs = logits.sigmoid()
            return [
                {
                    "labels": [self.id2label[j] for j in range(self.num_labels) if row[j] > threshold],
                    "scores": dict(zip(self.id2label, row.tolist(), strict=True)),
                }
                for row in probs
            ]
        probs = logits.softmax(-1)
        best = probs.argmax(-1)
        return [
            {
                "label": self.id2label[j],
                "score": row[j].item(),
                "scores": dict(zip(self.id2label, row.tolist(), strict=True)),
            }
            for row, j in zip(probs, best.tolist(), strict=True)
        ]

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy, P/R/F1 (and a confusion matrix for single-label; correlations for regression)."""
        from graft.metrics import compute_metrics, confusion_matrix

        refs = field(records, "label", self.task)
        if self.problem_type == "regression":
            got = [p["value"] for p in predictions]
            return compute_metrics("regression", got, [self.encode_label(r, {}, 0)[0] for r in refs])
        if self.problem_type == "multi_label":
            pred = [self.encode_label(p["labels"], {}, 0) for p in predictions]
            ref = [self.encode_label(r, records[i], i) for i, r in enumerate(refs)]
            return compute_metrics("multilabel", pred, ref)
        pred = [p["label"] for p in predictions]
        ref = [str(r) for r in refs]
        for i, label in enumerate(ref):
            self.encode_label(label, records[i], i)  # unknown labels are an error, not a silent miss
        metrics: dict[str, Any] = compute_metrics("classification", pred, ref)
        matrix = confusion_matrix(pred, ref, labels=self.id2label)
        metrics["confusion_matrix"] = {"labels": self.id2label, "matrix": matrix.tolist()}
        return metrics
