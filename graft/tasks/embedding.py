"""Sentence embeddings (chapter 9, semantic search): pooled hidden states, trained contrastively.

``embed`` turns texts into vectors with any body (mean pooling by default). ``EmbeddingHead`` is
the task head that trains them: a batch holds B (text, text_pair) pairs, and each text's pair is
its positive while the other B - 1 pairs are its negatives (in-batch negatives, the
MultipleNegativesRankingLoss of sentence-transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graft import kernels
from graft.errors import GraftError
from graft.nn import Transformer, TransformerOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, has_all, model_inputs, pad, window
from graft.tasks.pooling import POOLINGS, mean_pool, pool

__all__ = ["EmbeddingHead", "embed", "mean_pool", "pad"]


def unit_length(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(x, dim=-1) (the same numbers within 1e-7) in operators ONNX Runtime's symbolic shape
    inference follows: ReduceSum, Sqrt, Max, Div. F.normalize's Expand, and torch.norm's ReduceL2, stop
    that inference on the whole exported graph, and with it --optimize's skip-layer-norm fusion."""
    return x / (x * x).sum(-1, keepdim=True).sqrt().clamp_min(eps)  # (N, H)


class EmbeddingHead(Head):
    """No weights: pool the body's output into one (optionally unit-length) vector per text."""

    task = "embedding"

    def __init__(
        self, body: Transformer, pooling: str = "mean", normalize: bool = True, scale: float = 20.0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS or (pooling == "pooler" and body.pooler is None):
            raise GraftError(
                f"embedding: pooling {pooling!r} is not one of {', '.join(POOLINGS)} (for this model)"
            )
        self.config = body.config
        self.reads_pooler = pooling == "pooler"
        self.pooling, self.normalize, self.scale = pooling, normalize, scale

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        x = pool(self.pooling, out, batch, self.config)  # (N, H)
        return unit_length(x) if self.normalize else x

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Rows 0..B-1 are the texts, rows B.. their pairs; labels[i] is the pair row of text i, minus B.

        Cross-entropy over the scaled cosine similarities of each text to every pair in the batch.
        """
        B = labels.shape[0]
        vectors = F.normalize(logits.float(), dim=-1)
        similarity = vectors[:B] @ vectors[B:].T * self.scale  # (B, N - B)
        return F.cross_entropy(similarity, labels)

    def hf_config(self) -> dict[str, Any]:
        # saved as the bare model (transformers' AutoModel reads it) with graft_task = "embedding"
        return {"graft_pooling": self.pooling, "graft_normalize": self.normalize}

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        options = {"pooling": hf.get("graft_pooling"), "normalize": hf.get("graft_normalize")}
        return {k: v for k, v in options.items() if v is not None}

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """Texts; with ``text_pair`` in every record, the pairs follow the texts and ``labels`` pair them up."""
        texts = field(records, "text", self.task)
        paired = has_all(records, "text_pair")
        if paired:
            texts = texts + field(records, "text_pair", self.task)
        enc = tokenizer.encode(texts, max_length=window(self.config, tokenizer, max_length))
        batch: dict[str, Any] = model_inputs(enc, self.config)
        if paired:
            batch["labels"] = torch.arange(len(records))
        batch["num_records"] = len(records)
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'embedding': [...]} per record (of its text; its pair, when given, under 'pair_embedding')."""
        n = batch["num_records"]
        vectors = logits.detach().float().cpu()
        rows = [{"embedding": v.tolist()} for v in vectors[:n]]
        for row, pair in zip(rows, vectors[n:], strict=False):
            row["pair_embedding"] = pair.tolist()
        return rows

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Semantic search over the set: each text retrieves its pair among all pairs (accuracy@1, MRR);
        with numeric labels (STS-style scores), the Spearman correlation of cosine and label."""
        from graft.metrics import spearman

        a = F.normalize(torch.tensor([p["embedding"] for p in predictions]), dim=-1)
        metrics: dict[str, Any] = {}
        if all("pair_embedding" in p for p in predictions):
            b = F.normalize(torch.tensor([p["pair_embedding"] for p in predictions]), dim=-1)
            similarity = a @ b.T  # (N, N)
            right = similarity.diagonal()[:, None]
            rank = (similarity > right).sum(1) + 1  # (N,) 1 = the pair is the nearest
            metrics.update(
                accuracy_at_1=float((rank == 1).float().mean()), mrr=float((1 / rank.float()).mean())
            )
            labels = [r.get("label") for r in records]
            if all(_is_number(x) for x in labels):
                metrics["spearman"] = spearman(right.squeeze(1).tolist(), [float(x) for x in labels])
        return metrics


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped longest first, each group at most batch_size rows and max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # the first row of a group is its longest, so it sets the padded width
        full = current is None or len(current) == batch_size
        if not full and max_tokens is not None:
            full = (len(current) + 1) * lengths[current[0]] > max_tokens
        if full:
            batches.append([i])
        else:
            current.append(i)
    return batches


@torch.inference_mode()
def embed(
    model: Transformer,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int | None = None,
    normalize: bool = False,
    max_tokens: int | None = 1024,
    store: dict | None = None,
) -> torch.Tensor:
    """(N, H) sentence embeddings, in the order of ``texts``.

    Texts are encoded once without padding, then batched by length (longest first), so a
    batch carries almost no padding; results are put back in the input order. A batch holds
    as many texts as fit in ``max_tokens`` padded tokens (up to ``batch_size`` texts): many
    short texts or few long ones, about the same work per step. On CPU, 1024 tokens keep each
    layer's activations in cache between its matrix multiplies (measured: faster than 8192,
    see bench/embed.py). ``store``: where the kernels keep the packed weights between calls
    (``kernels_of(model).store(model)``: a server's many small calls); packed anew by default.
    """
    if not texts:
        return torch.zeros(0, model.config.hidden_size)
    limit = min(max_length or model.config.max_positions, model.config.max_positions)
    enc = tokenizer.encode(list(texts), max_length=limit, padding=False, return_tensors=None)
    pad_id = tokenizer.pad_token_id or 0
    out = torch.empty(len(texts), model.config.hidden_size)
    with kernels.frozen(model, store):  # the weights stay as they are for the whole call
        for rows in length_batches([len(ids) for ids in enc.input_ids], batch_size, max_tokens):
            ids, mask = pad([enc.input_ids[i] for i in rows], pad_id)
            types, _ = pad([enc.token_type_ids[i] for i in rows], 0)
            hidden = model(ids, mask, token_type_ids=types).last_hidden_state  # (B, T, H)
            out[rows] = mean_pool(hidden, mask).float()
    return F.normalize(out, dim=-1) if normalize else out
