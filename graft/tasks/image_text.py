"""Image-text contrastive learning (chapter 9, CLIP): the task head and the embedding functions.

A batch holds B (image, caption) records; each image's caption is its positive and the other
B - 1 captions its negatives, and the same for each caption: cross-entropy over the cosine
similarities scaled by the model's learned temperature, averaged over both directions (the
symmetric InfoNCE loss of CLIP, as transformers' ``CLIPModel(return_loss=True)``).

``encode_texts`` / ``encode_images`` embed any number of texts or images with a ``DualEncoder``
(in batches, unit length by default); graft.tasks.zeroshot and ``graft embed`` / ``search`` /
``zeroshot`` build on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from graft import kernels
from graft.errors import GraftError
from graft.nn import DualEncoder, DualEncoderConfig, DualEncoderOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, where, window
from graft.vision import ImageProcessor


@dataclass
class ImageTextProcessor:
    """A dual encoder's two processors: its tokenizer for texts, its ImageProcessor for images."""

    tokenizer: Any  # graft.tokenizer.Tokenizer
    images: ImageProcessor

    def save(self, folder: str | Path) -> None:
        self.tokenizer.save(folder)
        self.images.save(folder)


def with_augmentation(processor: Any, augment: str, crop_scale: Sequence[float]) -> Any:
    """``processor`` with a recipe's training augmentation (data.augment, data.crop_scale) for its
    images; a text model's tokenizer as it is, unless the recipe asked it for augmentation."""
    if isinstance(processor, ImageTextProcessor):
        return dataclasses.replace(processor, images=with_augmentation(processor.images, augment, crop_scale))
    if isinstance(processor, ImageProcessor):
        try:
            return dataclasses.replace(processor, augment=augment, scale=tuple(crop_scale))
        except GraftError as error:  # "augment: ..." or "crop_scale: ..." as the recipe names them
            raise GraftError(f"data.{error}") from None
    default = ImageProcessor()
    if augment != default.augment or tuple(crop_scale) != default.scale:
        raise GraftError(
            "data.augment, data.crop_scale: augmentation is for images, and this model reads text; remove them"
        )
    return processor


def dual_encoder(model: Any, what: str) -> DualEncoder:
    """The model's DualEncoder (bare, or under a head), or a one-line error naming what needed one."""
    body = getattr(model, "body", model)
    if not isinstance(body, DualEncoder):
        family = getattr(getattr(body, "config", None), "family", type(body).__name__)
        raise GraftError(f"{what}: a {family} model has no text and image towers (use a CLIP model)")
    return body


def text_inputs(
    cfg: DualEncoderConfig, tokenizer: Any, texts: list[str], max_length: int | None = None
) -> dict:
    """Tokenized texts: input_ids and attention_mask, (B, T) each, cut to the text tower's window."""
    enc = tokenizer.encode(texts, max_length=window(cfg.text, tokenizer, max_length))
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


@torch.inference_mode()
def encode_texts(
    model: DualEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    normalize: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """(N, P) the texts' embeddings in the shared space, in their order."""
    out = torch.empty(len(texts), model.config.projection_dim)
    with kernels.frozen(model):  # the weights stay as they are for the whole call
        for start in range(0, len(texts), batch_size):
            inputs = text_inputs(model.config, tokenizer, list(texts[start : start + batch_size]), max_length)
            out[start : start + batch_size] = model.encode_text(**inputs).float()
    return F.normalize(out, dim=-1) if normalize else out


@torch.inference_mode()
def encode_images(
    model: DualEncoder,
    processor: ImageProcessor,
    images: Sequence[Any],
    batch_size: int = 64,
    normalize: bool = True,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(N, P) the images' embeddings (paths, arrays or PIL images), in their order; ``names`` say
    which image an error is about."""
    out = torch.empty(len(images), model.config.projection_dim)
    dtype = next(model.parameters()).dtype
    with kernels.frozen(model):
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            named = list(names[start : start + batch_size]) if names is not None else None
            pixels = processor(chunk, named).to(dtype)  # (B, C, H, W)
            out[start : start + batch_size] = model.encode_image(pixels).float()
    return F.normalize(out, dim=-1) if normalize else out


def similarity(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """(N, M) logits_per_image: cosine similarities of N images and M texts times exp(logit_scale)."""
    images, texts = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    return logit_scale.exp() * images @ texts.T


class ImageTextHead(Head):
    """No weights: the towers' embeddings, unit length, times sqrt(exp(logit_scale)).

    The output rows are the B images, then the B captions; their dot products are then exactly
    CLIP's logits (scale x cosine), so the loss needs nothing but the output, and the learned
    temperature gets its gradient through it. Predictions are the unit vectors again.
    """

    task = "image-text"
    inputs = "image-text"

    def __init__(self, body: Any) -> None:
        super().__init__()
        self.config = dual_encoder(body, self.task).config

    def forward(self, out: DualEncoderOutput, batch: dict[str, Any]) -> torch.Tensor:
        parts = [x for x in (out.image_embeds, out.text_embeds) if x is not None]
        vectors = F.normalize(torch.cat(parts), dim=-1)  # (B + B, P)
        return vectors * (out.logit_scale.exp() ** 0.5)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """labels[i]: the caption row of image i (minus B); symmetric cross-entropy."""
        B = labels.shape[0]
        logits = logits.float()
        per_image = logits[:B] @ logits[B:].T  # (B, B) scale x cosine
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_image.T, labels)) / 2

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """``tokenizer``: the model's ImageTextProcessor. Records with an image and a text each
        (both needed to train); augmentation while the head is training."""
        if not isinstance(tokenizer, ImageTextProcessor):
            raise GraftError(f"{self.task}: records need the model's tokenizer and image processor")
        images = field(records, "image", self.task)
        texts = [str(t) for t in field(records, "text", self.task)]
        names = [
            img if isinstance(img, str) else where(r, i)
            for i, (r, img) in enumerate(zip(records, images, strict=True))
        ]
        batch: dict[str, Any] = {"pixel_values": tokenizer.images(images, names, train=self.training)}
        batch.update(text_inputs(self.config, tokenizer.tokenizer, texts, max_length))
        batch["labels"] = torch.arange(len(records))
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'image_embedding': [...], 'text_embedding': [...]} per record, unit length."""
        vectors = F.normalize(logits.detach().float().cpu(), dim=-1)
        B = vectors.shape[0] // 2
        return [
            {"image_embedding": a.tolist(), "text_embedding": b.tolist()}
            for a, b in zip(vectors[:B], vectors[B:], strict=True)
        ]

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        return retrieval_metrics(
            torch.tensor([p["image_embedding"] for p in predictions]),
            torch.tensor([p["text_embedding"] for p in predictions]),
            [str(r.get("text")) for r in records],
        )


def retrieval_metrics(
    images: torch.Tensor, texts: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways over a set of (image, caption) pairs: a hit is any item among the k
    nearest whose caption is the query's (captions written from templates repeat)."""
    relevant = torch.tensor([[a == b for b in captions] for a in captions])  # (N, N)
    scores = F.normalize(images.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T  # (N images, N texts)
    metrics = {}
    for name, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        order = s.argsort(dim=1, descending=True)  # (N, N) nearest first
        hits = relevant.gather(1, order)  # (N, N) whether each ranked item is relevant
        for k in ks:
            metrics[f"{name}_recall_at_{k}"] = float(hits[:, :k].any(1).float().mean())
    return metrics
