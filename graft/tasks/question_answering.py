"""Extractive question answering (chapter 5): the answer is a span of the context.

The head scores every token as the span's start and as its end. A context longer than the
model's window is cut into overlapping windows (``stride`` tokens shared by neighbours); each
window is a row of the batch, and decoding takes the best valid span over all the windows of a
question: start <= end, both inside the context, at most ``max_answer_length`` tokens. With
``unanswerable`` (SQuAD v2) the answer is empty when the "no answer" score (both ends on the first
token) beats the best span by more than ``null_threshold``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import GraftError
from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, has_all, model_inputs, where, window
from graft.tasks.hf_layout import hf_head
from graft.tasks.pooling import new_linear

Span = tuple[int, int]


def token_span(offsets: list[Span | None], start: int, end: int) -> Span | None:
    """Token positions of the first and last context token covering characters [start, end), or None
    when the window does not hold the whole answer."""
    context = [t for t, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return None
    first = max(t for t in context if offsets[t][0] <= start)
    last = min(t for t in context if offsets[t][1] >= end)
    return first, last


class QuestionAnsweringHead(Head):
    """dropout -> Linear(H, 2) on every position: (B, T, 2) start and end logits."""

    task = "question-answering"

    def __init__(
        self,
        body: Transformer,
        unanswerable: bool = False,
        stride: int = 128,
        max_answer_length: int = 30,
        n_best: int = 20,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        cfg = body.config
        self.spec = hf_head(cfg, self.task)
        self.config = cfg
        self.unanswerable = unanswerable  # SQuAD v2: questions may have no answer in the context
        self.stride, self.max_answer_length, self.n_best = stride, max_answer_length, n_best
        self.drop = nn.Dropout(self.spec.dropout_rate(cfg.hf_config) if dropout is None else dropout)
        self.out = new_linear(
            cfg.hidden_size, 2, bias=self.spec.bias, std=cfg.hf_config.get("initializer_range", 0.02)
        )

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        return self.out(self.drop(out.last_hidden_state))  # (B, T, 2): start, end

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """labels (B, 2): start and end token of the answer (the first token when it is not in the window)."""
        T = logits.shape[1]
        labels = labels.clamp(0, T)  # as transformers: positions outside the row are ignored
        start = F.cross_entropy(logits[..., 0].float(), labels[:, 0], ignore_index=T)
        end = F.cross_entropy(logits[..., 1].float(), labels[:, 1], ignore_index=T)
        return (start + end) / 2

    def hf_names(self) -> dict[str, str]:
        return self.spec.names()

    def hf_config(self) -> dict[str, Any]:
        return {"graft_unanswerable": True} if self.unanswerable else {}

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        return {"unanswerable": True} if hf.get("graft_unanswerable") else {}

    # ---- records in, predictions out ----
    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """Question + context pairs, one row per window; ``labels`` (rows, 2) when records have answers."""
        questions = [q.lstrip() for q in field(records, "question", self.task)]
        contexts = field(records, "context", self.task)
        limit = window(self.config, tokenizer, max_length)
        stride = min(self.stride, limit // 2)
        enc = tokenizer.encode(
            questions,
            contexts,
            max_length=limit,
            truncation="only_second",
            stride=stride,
            return_overflowing=True,
        )
        # context tokens keep their character span; question, special and pad tokens get None
        offsets = [
            [o if s == 1 else None for o, s in zip(row, seq, strict=True)]
            for row, seq in zip(enc.offsets, enc.sequence_ids, strict=True)
        ]
        mask = enc.attention_mask
        batch: dict[str, Any] = model_inputs(enc, self.config)
        batch.update(
            offsets=offsets,
            example=enc.overflow_to_sample.tolist(),
            contexts=contexts,
            null_index=mask.argmax(-1).tolist(),  # each row's first real token stands for "no answer"
        )
        if has_all(records, "answers"):
            batch["labels"] = self.align_answers(records, batch)
        return batch

    def align_answers(self, records: list[dict[str, Any]], batch: dict[str, Any]) -> torch.Tensor:
        """(rows, 2) start/end token of the first gold answer; the null position when it is not in the window."""
        labels = []
        for row, example in enumerate(batch["example"]):
            record, null = records[example], batch["null_index"][row]
            answers = record["answers"]
            texts, starts = answers.get("text", []), answers.get("answer_start", [])
            if not texts:
                labels.append((null, null))
                continue
            start = int(starts[0])
            end = start + len(texts[0])
            if record["context"][start:end] != texts[0]:
                raise GraftError(
                    f"{where(record, example)}: answer {texts[0]!r} is not at character {start} of the context"
                )
            labels.append(token_span(batch["offsets"][row], start, end) or (null, null))
        return torch.tensor(labels, dtype=torch.long)

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """One answer per question: {'answer', 'start', 'end', 'score', 'answers': n best spans}.

        options: n_best, max_answer_length, unanswerable, null_threshold (default 0.0).
        """
        n_best = options.get("n_best") or self.n_best
        max_len = options.get("max_answer_length") or self.max_answer_length
        unanswerable = options.get("unanswerable", self.unanswerable)
        null_threshold = options.get("null_threshold") or 0.0
        logits = logits.detach().float().cpu()  # (rows, T, 2)
        rows_of: dict[int, list[int]] = {}
        for row, example in enumerate(batch["example"]):
            rows_of.setdefault(example, []).append(row)

        results = []
        for example in sorted(rows_of):
            context = batch["contexts"][example]
            spans: dict[Span, float] = {}  # character span -> best score over the windows
            null_score = None
            for row in rows_of[example]:
                start_logits, end_logits = logits[row, :, 0], logits[row, :, 1]
                offsets = batch["offsets"][row]
                null = batch["null_index"][row]
                score = float(start_logits[null] + end_logits[null])
                null_score = score if null_score is None else min(null_score, score)
                # the best among the context's tokens alone: padding and the question are never a
                # span's end, and must not crowd the context out of the n best (or a window's
                # answer would depend on what it was batched with)
                outside = torch.tensor(
                    [o is None for o in offsets] + [True] * (len(start_logits) - len(offsets))
                )
                starts, ends = (
                    logits.masked_fill(outside, float("-inf")).argsort(descending=True)[:n_best].tolist()
                    for logits in (start_logits, end_logits)
                )
                for s in starts:
                    for e in ends:
                        if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_len:
                            continue
                        span = (offsets[s][0], offsets[e][1])
                        score = float(start_logits[s] + end_logits[e])
                        spans[span] = max(score, spans.get(span, score))
            best = sorted(spans.items(), key=lambda item: -item[1])[:n_best]
            scores = torch.tensor([s for _, s in best] + ([null_score] if unanswerable else []))
            probs = scores.softmax(0).tolist() if len(scores) else []
            answers = [
                {"text": context[a:b], "start": a, "end": b, "score": p}
                for ((a, b), _), p in zip(best, probs, strict=False)
            ]
            no_answer = not best or (unanswerable and null_score - best[0][1] > null_threshold)
            if no_answer:
                top = {"answer": "", "start": None, "end": None, "score": probs[-1] if unanswerable else 0.0}
            else:
                top = {"answer": answers[0]["text"], "start": best[0][0][0], "end": best[0][0][1]}
                top["score"] = answers[0]["score"]
            results.append({**top, "answers": answers})
        return results

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """SQuAD exact match and F1 (0-100); with unanswerable questions, also on each half."""
        from graft.metrics import compute_metrics

        golds = [a.get("text", []) for a in field(records, "answers", self.task)]
        answers = [p["answer"] for p in predictions]
        metrics: dict[str, Any] = compute_metrics("qa", answers, golds)
        has = [i for i, g in enumerate(golds) if g]
        if len(has) < len(golds):
            for name, index in (
                ("has_answer", has),
                ("no_answer", [i for i, g in enumerate(golds) if not g]),
            ):
                if index:
                    part = compute_metrics("qa", [answers[i] for i in index], [golds[i] for i in index])
                    metrics.update({f"{name}_{k}": v for k, v in part.items()})
        return metrics
