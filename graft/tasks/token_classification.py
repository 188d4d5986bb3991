"""Token classification (chapter 5): named entities as BIO/IOB2 tags, one per word.

A word may be split into several word pieces; the label of a word sits on its first piece
(the other pieces get -100 and no loss), and a prediction is read from that same piece. Words
are then grouped into entities whose character spans point into the original text.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.data.records import label_error
from graft.errors import GraftError
from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head
from graft.tasks.classification import labels_list
from graft.tasks.collate import field, has_all, model_inputs, where, window
from graft.tasks.hf_layout import hf_head
from graft.tasks.pooling import new_linear

IGNORE = -100  # label of pieces that are not the first of their word, of special tokens and of padding


def word_spans_of_tokens(words: list[str]) -> list[tuple[int, int]]:
    """Character spans of the words in ``' '.join(words)``."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


def word_spans_of_text(word_ids: list[int | None], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of the words the tokenizer found in a text: first piece's start to last piece's end."""
    spans: dict[int, tuple[int, int]] = {}
    for word, (start, end) in zip(word_ids, offsets, strict=True):
        if word is not None:
            spans[word] = (
                (min(start, spans[word][0]), max(end, spans[word][1])) if word in spans else (start, end)
            )
    return [spans[w] for w in sorted(spans)]


def word_ids_of_spans(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], spans: list[tuple[int, int]]
) -> list[int | None]:
    """Which given word each piece falls in (by its first character); None for special and pad tokens."""
    starts = [s for s, _ in spans]
    ids: list[int | None] = []
    for (start, end), seq in zip(offsets, sequence_ids, strict=True):
        word = bisect_right(starts, start) - 1
        inside = seq is not None and end > start and word >= 0 and start < spans[word][1]
        ids.append(word if inside else None)
    return ids


def entities(
    tags: list[str], spans: list[tuple[int, int]], text: str, scores: list[float]
) -> list[dict[str, Any]]:
    """Entity spans (type, character start/end, text, mean word score) of one tag sequence."""
    from graft.metrics import get_entities

    found = []
    for kind, first, last in get_entities(tags):
        start, end = spans[first][0], spans[last][1]
        score = sum(scores[first : last + 1]) / (last - first + 1)
        found.append({"type": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return found


class TokenClassificationHead(Head):
    """dropout -> out on every position: (B, T, num_labels) logits."""

    task = "token-classification"

    def __init__(
        self,
        body: Transformer,
        num_labels: int | None = None,
        id2label: list[str] | dict | None = None,
        dropout: float | None = None,
        stride: int = 32,
    ) -> None:
        super().__init__()
        cfg = body.config
        self.stride = stride  # tokens shared by neighbouring windows of a long sentence
        self.id2label = (
            labels_list(id2label) if id2label is not None else [f"LABEL_{i}" for i in range(num_labels or 2)]
        )
        if num_labels is not None and num_labels != len(self.id2label):
            raise GraftError(
                f"token-classification: num_labels={num_labels} but id2label has {len(self.id2label)}"
            )
        self.spec = hf_head(cfg, self.task)
        self.config = cfg
        self.drop = nn.Dropout(self.spec.dropout_rate(cfg.hf_config) if dropout is None else dropout)
        std = cfg.hf_config.get("initializer_range", 0.02)
        self.out = new_linear(cfg.hidden_size, len(self.id2label), bias=self.spec.bias, std=std)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        return self.out(self.drop(out.last_hidden_state))  # (B, T, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over labelled pieces (the first piece of each word)."""
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
        )

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        return int((labels != IGNORE).sum())

    def hf_names(self) -> dict[str, str]:
        return self.spec.names()

    def hf_config(self) -> dict[str, Any]:
        return {
            "id2label": {str(i): label for i, label in enumerate(self.id2label)},
            "label2id": {label: i for i, label in enumerate(self.id2label)},
        }

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        return {"id2label": labels_list(hf["id2label"])} if hf.get("id2label") else {}

    # ---- records in, predictions out ----
    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """Records with ``tokens`` (words; ``tags`` for training) or with a raw ``text``.

        A sentence longer than the window is cut into windows that overlap by ``stride`` tokens,
        one row each (``example`` maps rows to records); a word is labelled in every window that
        holds its first piece.
        """
        limit = window(self.config, tokenizer, max_length)
        stride = min(self.stride, limit // 2)
        if has_all(records, "tokens"):
            # The words are joined with spaces and tokenized as text, then each piece is matched to its
            # word by character offsets: the pieces are those of the same sentence as raw text (byte-level
            # BPE marks a word start with the space before it), whatever the tokenizer.
            words = [list(map(str, ws)) for ws in field(records, "tokens", self.task)]
            texts = [" ".join(ws) for ws in words]
            spans = [word_spans_of_tokens(ws) for ws in words]
            enc = tokenizer.encode(texts, max_length=limit, stride=stride, return_overflowing=True)
            example = enc.overflow_to_sample.tolist()
            word_ids = [
                word_ids_of_spans(offs, seq, spans[example[row]])
                for row, (offs, seq) in enumerate(zip(enc.offsets, enc.sequence_ids, strict=True))
            ]
        else:
            texts = field(records, "text", self.task)
            enc = tokenizer.encode(texts, max_length=limit, stride=stride, return_overflowing=True)
            example = enc.overflow_to_sample.tolist()
            word_ids = [list(ids) for ids in enc.word_ids]
            spans = []
            for i in range(len(texts)):  # the words the tokenizer found, over all windows of the text
                rows = [row for row, e in enumerate(example) if e == i]
                present = sorted({w for row in rows for w in word_ids[row] if w is not None})
                number = {w: n for n, w in enumerate(present)}  # a word that gave no piece is skipped
                for row in rows:
                    word_ids[row] = [None if w is None else number[w] for w in word_ids[row]]
                flat_ids = [w for row in rows for w in word_ids[row]]
                spans.append(word_spans_of_text(flat_ids, [o for row in rows for o in enc.offsets[row]]))
            words = [[text[s:e] for s, e in row] for text, row in zip(texts, spans, strict=True)]
        # in each row, word -> position of its first piece (absent when the window cut the word's start)
        firsts = []
        for row, ids in enumerate(word_ids):
            word_starts = spans[example[row]]
            firsts.append(
                {
                    w: p
                    for p, w in reversed(list(enumerate(ids)))
                    if w is not None and enc.offsets[row][p][0] <= word_starts[w][0]
                }
            )
        batch: dict[str, Any] = model_inputs(enc, self.config)
        batch.update(
            words=words, word_spans=spans, texts=texts, example=example, word_ids=word_ids, firsts=firsts
        )
        if has_all(records, "tags") and has_all(records, "tokens"):
            batch["labels"] = self.align_labels(records, batch)
        return batch

    def align_labels(self, records: list[dict[str, Any]], batch: dict[str, Any]) -> torch.Tensor:
        """(rows, T) label ids on the first piece of each word, IGNORE elsewhere."""
        label2id = {label: i for i, label in enumerate(self.id2label)}
        labels = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, record in enumerate(records):
            if len(record["tags"]) != len(record["tokens"]):
                raise GraftError(
                    f"{where(record, i)}: {len(record['tokens'])} tokens but {len(record['tags'])} tags"
                )
            unknown = [str(t) for t in record["tags"] if str(t) not in label2id]
            if unknown:
                raise label_error(
                    "unknown label",
                    f"{where(record, i)}, column 'tags'",
                    unknown[0],
                    self.id2label,
                    "is not one of the model's labels",
                )
        for row, first in enumerate(batch["firsts"]):
            tags = records[batch["example"][row]]["tags"]
            for word, position in first.items():
                labels[row, position] = label2id[str(tags[word])]
        return labels

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'tokens', 'tags', 'scores', 'entities': [{'type', 'start', 'end', 'text', 'score'}]} per record.

        A word seen in several windows is read from the one where it has the most context around it.
        """
        probs = logits.detach().float().softmax(-1).cpu()  # (rows, T, C)
        best: list[dict[int, tuple[int, int, int]]] = [
            {} for _ in batch["words"]
        ]  # word -> (margin, row, pos)
        for row, first in enumerate(batch["firsts"]):
            content = [p for p, w in enumerate(batch["word_ids"][row]) if w is not None]
            for word, position in first.items():
                margin = min(position - content[0], content[-1] - position)
                seen = best[batch["example"][row]]
                if word not in seen or margin > seen[word][0]:
                    seen[word] = (margin, row, position)
        results = []
        for i, words in enumerate(batch["words"]):
            tags, scores = [], []
            for w in range(len(words)):
                if w in best[i]:
                    _, row, position = best[i][w]
                    p, j = probs[row, position].max(-1)
                    tags.append(self.id2label[int(j)])
                    scores.append(float(p))
                else:  # a word without pieces (empty, or only characters the tokenizer drops)
                    tags.append("O")
                    scores.append(0.0)
            results.append(
                {
                    "tokens": words,
                    "tags": tags,
                    "scores": scores,
                    "entities": entities(tags, batch["word_spans"][i], batch["texts"][i], scores),
                }
            )
        return results

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Entity-level precision, recall, F1 (seqeval's rules), token accuracy, and a per-type report."""
        from graft.metrics import compute_metrics, entity_report

        refs = [list(map(str, tags)) for tags in field(records, "tags", self.task)]
        preds = [p["tags"] for p in predictions]
        metrics: dict[str, Any] = compute_metrics("ner", preds, refs)
        metrics["per_type"] = entity_report(preds, refs)
        return metrics
