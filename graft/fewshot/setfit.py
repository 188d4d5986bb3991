"""SetFit (Tunstall et al. 2022): few-shot classification with a sentence encoder, in two steps.

1. Contrastive fine-tuning on pairs of the few labelled texts: for each text, in each of
   ``iterations`` rounds, one positive pair (another text of its class, target cosine 1) and one
   negative pair (a text of another class, target 0); the loss is the squared error of the pair's
   cosine similarity to its target (sentence-transformers' CosineSimilarityLoss). It runs through
   graft's Trainer, so optimizers, schedules and strategies are the recipe's.
2. A head on the tuned embeddings: multinomial logistic regression (L2, C = 1 as scikit-learn's
   default), fitted with L-BFGS.

A SetFit folder is the encoder in HF layout (the embedding task, graft/tasks/embedding.py) plus
setfit_head.json (the classes) and setfit_head.safetensors (the head's weight and bias).
``graft predict`` and ``graft eval`` read it as a classification model (``SetFitTask``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from graft.errors import GraftError

HEAD_FILE = "setfit_head.json"
HEAD_WEIGHTS = "setfit_head.safetensors"


def pairs(
    texts: Sequence[str], labels: Sequence[str], iterations: int = 20, seed: int = 0
) -> list[dict[str, Any]]:
    """2 x iterations x N records {text, text_pair, label}: label 1.0 for a positive pair (same class,
    another text when the class has one), 0.0 for a negative pair (another class), seeded."""
    if len(set(labels)) < 2:
        raise GraftError("setfit: contrastive pairs need examples of at least two classes")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    others = {label: [i for i in range(len(labels)) if labels[i] != label] for label in groups}
    records = []
    for _ in range(iterations):
        for i, label in enumerate(labels):
            same = [j for j in groups[label] if j != i] or [i]
            j = rng.choice(same)
            records.append({"text": texts[i], "text_pair": texts[j], "label": 1.0})
            j = rng.choice(others[label])
            records.append({"text": texts[i], "text_pair": texts[j], "label": 0.0})
    return records


def cosine_loss(vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (2B, P), (B,) -> ()
    """Mean squared error of each pair's cosine similarity to its target (rows 0..B-1 and B..2B-1 pair up)."""
    B = targets.shape[0]
    cos = F.cosine_similarity(vectors[:B].float(), vectors[B:].float(), dim=-1)  # (B,)
    return F.mse_loss(cos, targets.float())


def collate_pairs(head: Any, tokenizer: Any, max_length: int | None):
    """Records -> a batch of texts then their pairs, ``labels`` the pairs' target cosines."""

    def collate(records: list[dict[str, Any]]) -> dict[str, Any]:
        batch = head.collate(records, tokenizer, max_length)
        batch["labels"] = torch.tensor([float(r["label"]) for r in records])  # (B,)
        return batch

    return collate


def pair_loss(model: Any, records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int | None) -> float:
    """The contrastive loss over ``records`` (evaluation mode): what training lowers."""
    collate = collate_pairs(model.head, tokenizer, max_length)
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(records), 64):
            chunk = list(records[start : start + 64])
            batch = collate(chunk)
            labels = batch.pop("labels")
            total += float(cosine_loss(model(**batch).logits, labels)) * len(chunk)
    return total / max(len(records), 1)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, P), bias (C,)) of multinomial logistic regression on (N, P) features: the summed
    cross-entropy plus ||W||^2 / 2C (the bias is not penalized), minimized by L-BFGS."""
    x = x.double()
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=500, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + weight.square().sum() / (2 * c)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


@dataclass
class SetFit:
    """A tuned sentence encoder (an embedding TaskModel) and its logistic-regression head."""

    encoder: Any
    tokenizer: Any
    classes: list[str]
    weight: torch.Tensor  # (C, P)
    bias: torch.Tensor  # (C,)
    max_length: int | None = None

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # -> (N, P)
        from graft.tasks.embedding import embed

        self.encoder.eval()
        return embed(
            self.encoder.body, self.tokenizer, list(texts), max_length=self.max_length, normalize=True
        )

    def logits(self, texts: Sequence[str]) -> torch.Tensor:  # -> (N, C)
        return self.embed(texts) @ self.weight.T + self.bias

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.classes[i] for i in self.logits(texts).argmax(-1).tolist()]

    def save(self, folder: str | Path) -> Path:
        """The folder, written whole (atomically): the encoder in HF layout and the head."""
        from safetensors.torch import save_file

        from graft.io.atomic import atomic_folder
        from graft.loading import save_model

        with atomic_folder(folder) as tmp:
            save_model(self.encoder, tmp, self.tokenizer)
            save_file(
                {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, tmp / HEAD_WEIGHTS
            )
            (tmp / HEAD_FILE).write_text(
                json.dumps({"classes": self.classes, "max_length": self.max_length}, indent=2),
                encoding="utf-8",
            )
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> SetFit:
        from safetensors.torch import load_file

        from graft.io.hf import read_json
        from graft.loading import load_model
        from graft.tokenizer import Tokenizer

        folder = Path(folder)
        if not (folder / HEAD_FILE).exists() or not (folder / HEAD_WEIGHTS).exists():
            raise GraftError(f"{folder}: not a SetFit folder (no {HEAD_FILE} and {HEAD_WEIGHTS})")
        meta = read_json(folder / HEAD_FILE)
        tensors = load_file(str(folder / HEAD_WEIGHTS))
        classes = meta.get("classes")
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if (
            not isinstance(classes, list)
            or weight is None
            or bias is None
            or weight.ndim != 2
            or weight.shape[0] != len(classes)
            or bias.shape != (len(classes),)
        ):
            raise GraftError(f"{folder / HEAD_FILE}: the classes do not match the head's weight and bias")
        encoder = load_model(folder, task="embedding")
        if weight.shape[1] != encoder.config.hidden_size:
            raise GraftError(
                f"{folder / HEAD_WEIGHTS}: weight has {weight.shape[1]} inputs, the encoder gives {encoder.config.hidden_size}"
            )
        return cls(encoder, Tokenizer.from_folder(folder), classes, weight, bias, meta.get("max_length"))


def is_setfit(folder: str | Path) -> bool:
    """Whether ``folder`` was written by SetFit.save (``graft setfit``): its head files are there (one
    without the other is SetFit.load's error, not another kind of model)."""
    folder = Path(folder)
    return (folder / HEAD_FILE).exists() or (folder / HEAD_WEIGHTS).exists()


class SetFitTask:
    """A SetFit folder as ``graft predict`` and ``graft eval`` see a classification model: its ``task``,
    a ``head`` that reads the records, writes each prediction ({label, score, scores}: the softmax of
    the logistic regression's logits, scikit-learn's predict_proba) and computes the metrics, and
    ``predict``. It runs on the CPU, where SetFit.embed does."""

    task = "classification"

    def __init__(self, setfit: SetFit) -> None:
        from graft.tasks.classification import ClassificationHead

        self.setfit = setfit
        # a single-label classification head with the SetFit classes, for what it does with records
        # and predictions (label checks, postprocess, evaluate) only: its layers are never run
        self.head = ClassificationHead(setfit.encoder.body, id2label=setfit.classes)

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> SetFitTask:
        if device not in (None, "cpu"):
            raise GraftError(
                f"--device {device}: a SetFit folder ({folder}) predicts on the CPU; pass --device cpu"
            )
        return cls(SetFit.load(folder))

    @torch.inference_mode()
    def predict(
        self,
        tokenizer: Any,
        records: Iterable[dict[str, Any]],
        batch_size: int = 32,
        max_length: int | None = None,
        **options: Any,
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(record, prediction) pairs in the order of ``records``, as graft.tasks.predict.predict gives
        them; the SetFit folder's own tokenizer reads the texts (``tokenizer`` is the same one)."""
        from graft.tasks.collate import field
        from graft.tasks.predict import batches

        if max_length is not None:
            self.setfit.max_length = max_length
        for chunk in batches(records, batch_size):
            if any(r.get("text_pair") for r in chunk):
                raise GraftError("setfit: the model classifies single texts; these records have a text_pair")
            logits = self.setfit.logits(field(chunk, "text", self.task))  # (B, C)
            yield from zip(chunk, self.head.postprocess(logits, {}, **options), strict=True)


def train_setfit(
    recipe: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str] | None = None,
    iterations: int = 20,
    quiet: bool = True,
    max_pairs: int | None = None,
) -> SetFit:
    """SetFit on the few labelled ``texts``: the recipe's model, optimizer, schedule, strategy and
    train.* (output, epochs, batch size, seed) tune the encoder on pairs; then the head is fitted.

    ``max_pairs``: at most this many pairs, a seeded sample (SetFit's max_steps for larger sets).
    The run folder train.output keeps the log (no checkpoints: the recipe's checkpoint section is
    the caller's; curve turns them off)."""
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer
    from graft.train.loop import Trainer

    classes = list(classes) if classes is not None else sorted(set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise GraftError(f"setfit: label {unknown[0]!r} is not one of the classes ({', '.join(classes)})")
    folder = resolve(recipe.model.path)
    tokenizer = Tokenizer.from_folder(folder)
    torch.manual_seed(recipe.train.seed)
    model = load_model(folder, task="embedding", kernels=recipe.model.kernels, to_train=True)
    if recipe.strategy.name != "full" or recipe.strategy.options:
        from graft.strategies import apply_strategy

        model = apply_strategy(model, recipe.strategy.name, recipe.strategy.options)
    max_length = recipe.data.max_length
    records = pairs(texts, labels, iterations, recipe.train.seed)
    if max_pairs is not None and len(records) > max_pairs:  # many labels: a seeded sample of the pairs
        records = random.Random(recipe.train.seed).sample(records, max_pairs)
    trainer = Trainer(
        model,
        recipe,
        records,
        collate_pairs(model.head, tokenizer, max_length),
        loss=(
            lambda logits, batch: cosine_loss(logits, batch["labels"]),
            lambda batch: batch["labels"].shape[0],
        ),
        tokenizer=tokenizer,
        quiet=quiet,
    )
    trainer.fit(overwrite=True)
    model = trainer.module.cpu()  # embedding for the head runs where graft.tasks.embedding.embed does
    tuned = SetFit(model, tokenizer, classes, torch.zeros(0), torch.zeros(0), max_length)
    x = tuned.embed(texts)  # (N, P)
    y = torch.tensor([classes.index(label) for label in labels])
    tuned.weight, tuned.bias = fit_logistic(x, y, len(classes))
    return tuned
