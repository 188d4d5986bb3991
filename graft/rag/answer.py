"""Retrieval, reranking, the prompt with numbered sources, and the evaluation of both (chapter 10).

``retrieve`` embeds a question with the index's embedder and takes the nearest chunks; with a
cross-encoder (``Reranker``: a classification model reading (question, chunk) pairs) it takes more
candidates and keeps the ``k`` the cross-encoder scores highest. ``messages`` is the chat a chat
model answers: a system message asking for citations, then the sources numbered [1]..[k] and the
question. ``evaluate`` gives retrieval recall@k and MRR against each question's gold source or
chunk, and, with answers, their ROUGE-L F-measure against reference answers (graft.metrics).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.rag.corpus import read_file
from graft.rag.index import Embedder, Hit, Index

SYSTEM = (
    "Answer the question using only the numbered sources below. Cite the source of each statement "
    "with its number in brackets, like [1] or [2]. If the sources do not hold the answer, say so."
)


class Reranker:
    """A cross-encoder: a classification model's score for (question, passage) pairs.

    One output (MS MARCO cross-encoders): its logit; several: the log-probability of the last class
    (the "relevant" one of two-class models).
    """

    def __init__(self, model: str | Path, kernels: bool = True) -> None:
        from graft.io.hf import resolve
        from graft.loading import load_model
        from graft.tokenizer import Tokenizer

        folder = resolve(model)
        self.model = load_model(folder, kernels=kernels)
        if getattr(self.model, "task", None) != "classification":
            raise GraftError(
                f"--rerank {model}: not a classification model (a cross-encoder scores (question, passage) "
                "pairs with a classification head)"
            )
        self.tokenizer = Tokenizer.from_folder(folder)

    @torch.inference_mode()
    def scores(self, question: str, passages: Sequence[str], batch_size: int = 16) -> list[float]:
        from graft.tasks.collate import model_inputs, window

        cfg = self.model.config
        limit = window(cfg, self.tokenizer)
        out: list[float] = []
        for i in range(0, len(passages), batch_size):
            part = list(passages[i : i + batch_size])
            enc = self.tokenizer.encode(
                [question] * len(part), part, max_length=limit, truncation="only_second"
            )
            logits = self.model(**model_inputs(enc, cfg)).logits.float()  # (B, C)
            out += (logits[:, 0] if logits.shape[1] == 1 else logits.log_softmax(-1)[:, -1]).tolist()
        return out


def retrieve(
    index: Index,
    embedder: Embedder,
    question: str,
    k: int = 4,
    reranker: Reranker | None = None,
    candidates: int | None = None,
) -> list[Hit]:
    """The ``k`` best chunks for ``question``; reranked from ``candidates`` (default 4k) nearest."""
    query = embedder.embed([question])[0]  # (D,)
    if reranker is None:
        return index.search(query, k)
    hits = index.search(query, max(k, candidates or 4 * k))
    scores = reranker.scores(question, [h.chunk.text for h in hits])
    ranked = sorted(zip(scores, hits, strict=True), key=lambda pair: -pair[0])  # stable: ties keep order
    return [Hit(h.id, s, h.chunk) for s, h in ranked[:k]]


def sources_text(hits: Sequence[Hit]) -> str:
    """The sources as the prompt lists them: [n] (source) and the chunk's text."""
    return "\n\n".join(f"[{n}] ({h.chunk.source})\n{h.chunk.text.strip()}" for n, h in enumerate(hits, 1))


def messages(question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
    """The chat: a system message asking for cited answers, then the numbered sources and the question."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Sources:\n\n{sources_text(hits)}\n\nQuestion: {question.strip()}"},
    ]


@dataclass
class Question:
    question: str
    answer: str | None  # the reference answer (ROUGE-L)
    sources: list[str]  # gold sources: a chunk from any of them is a right retrieval
    chunks: list[int]  # gold chunk ids (rows of the index)
    line: int


def read_questions(path: Path) -> list[Question]:
    """QA.jsonl: {"question": ..., "answer": ..., "source": FILE or [FILES], "chunk": ID or [IDS]} a line."""
    data = read_file(path)
    questions = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise GraftError(f"{where}: invalid JSON ({getattr(e, 'msg', 'not UTF-8 text')})") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise GraftError(f'{where}: expected an object with a "question" string')
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise GraftError(f'{where}: "answer" must be a string')
        sources, chunks = as_list(record.get("source")), as_list(record.get("chunk"))
        if not all(isinstance(s, str) for s in sources) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in chunks
        ):
            raise GraftError(f'{where}: "source" takes file names (strings), "chunk" chunk ids (integers)')
        questions.append(Question(record["question"], answer, sources, chunks, number))
    if not questions:
        raise GraftError(f"{path}: no questions (one JSON object a line)")
    return questions


def as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def is_gold(hit: Hit, question: Question) -> bool:
    """A retrieved chunk is right when it is a gold chunk or comes from a gold source (its path as
    indexed, or its file name)."""
    source = hit.chunk.source
    return hit.id in question.chunks or any(s in (source, Path(source).name) for s in question.sources)


def evaluate(
    questions: Sequence[Question], retrieved: Sequence[Sequence[Hit]], answers: Sequence[str] | None = None
) -> dict[str, float]:
    """recall@1, recall@k and MRR over the questions with a gold source or chunk (k: the hits given
    per question); with ``answers``, ROUGE-L against the reference answers."""
    from graft.metrics.text import rouge

    metrics: dict[str, float] = {"questions": len(questions)}
    graded = [(q, hits) for q, hits in zip(questions, retrieved, strict=True) if q.sources or q.chunks]
    if graded:
        k = max(len(hits) for _, hits in graded)
        ranks = [next((r for r, h in enumerate(hits, 1) if is_gold(h, q)), None) for q, hits in graded]
        for at in sorted({1, k}):
            metrics[f"recall@{at}"] = sum(r is not None and r <= at for r in ranks) / len(ranks)
        metrics["mrr"] = sum(1 / r for r in ranks if r is not None) / len(ranks)
    if answers is not None:
        pairs = [(a, q.answer) for a, q in zip(answers, questions, strict=True) if q.answer is not None]
        if pairs:
            metrics["rougeL"] = rouge([a for a, _ in pairs], [r for _, r in pairs])["rougeL"]
    return metrics
