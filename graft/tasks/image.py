"""Image classification (chapter 3): the classification head on an image body.

Everything but the inputs is sequence classification's (labels, problem types, loss, HF
checkpoints, predictions, metrics): records hold an ``image`` (a file path, or the array an image
folder, IDX file or Hub dataset gives), the model's ``ImageProcessor`` (graft.vision) turns them
into pixel values, with the training augmentation while the model trains. The head reads [CLS]
(as transformers' *ForImageClassification) or the mean of the patch vectors (timm's avg pool).
"""

from __future__ import annotations

from typing import Any

import torch

from graft.errors import GraftError
from graft.nn import Transformer, TransformerOutput
from graft.tasks.classification import ClassificationHead
from graft.tasks.collate import field, has_all, where
from graft.vision import ImageProcessor

POOLINGS = ("cls", "mean")


def pixel_values(records: list[dict[str, Any]], processor: Any, task: str, train: bool) -> torch.Tensor:
    """(B, C, H, W) from the records' images; an error names the record when one has none."""
    if not isinstance(processor, ImageProcessor):
        raise GraftError(f"{task}: images need the model's image processor, not {type(processor).__name__}")
    images = field(records, "image", task)
    names = [
        img if isinstance(img, str) else where(r, i)
        for i, (r, img) in enumerate(zip(records, images, strict=True))
    ]
    return processor(images, names, train=train)


class ImageClassificationHead(ClassificationHead):
    """[CLS] or mean of patches -> dropout -> out: (B, num_labels) logits."""

    task = "image-classification"
    inputs = "patches"

    def __init__(self, body: Transformer, pooling: str | None = None, **options: Any) -> None:
        cfg = body.config
        if cfg.inputs != "patches":
            raise GraftError(
                f"{self.task}: a {cfg.family} model reads {cfg.inputs}, not images (use an image model: vit, deit)"
            )
        if pooling is not None and pooling not in POOLINGS:
            raise GraftError(f"{self.task}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        super().__init__(body, pooling=pooling, **options)
        self.prefix = cfg.prefix_tokens

    def rows(self, batch: dict[str, Any]) -> torch.Tensor | None:
        pixels = batch.get("pixel_values")
        if self.pooling != "cls" or pixels is None:
            return None
        return torch.zeros(pixels.shape[0], 1, dtype=torch.long, device=pixels.device)  # (B, 1): [CLS]

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        hidden = out.last_hidden_state  # (B, T, H), or (B, 1, H) with rows
        x = hidden[:, 0] if self.pooling == "cls" else hidden[:, self.prefix :].mean(1)  # (B, H)
        return self.out(self.drop(x))  # (B, C)

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """``tokenizer`` is the model's ImageProcessor; augmentation while the head is training."""
        batch: dict[str, Any] = {"pixel_values": pixel_values(records, tokenizer, self.task, self.training)}
        if has_all(records, "label"):
            labels = [self.encode_label(r["label"], r, i) for i, r in enumerate(records)]
            dtype = torch.long if self.problem_type == "single_label" else torch.float
            batch["labels"] = torch.tensor(labels, dtype=dtype)
            if self.problem_type == "regression" and self.num_labels == 1:
                batch["labels"] = batch["labels"].squeeze(-1)
        return batch
