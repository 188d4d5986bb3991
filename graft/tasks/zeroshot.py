"""Zero-shot classification (chapter 9): classes named in words, no training.

Each label becomes a vector: the label written into every prompt template ("a photo of a {}."),
each prompt embedded and made unit length, their mean made unit length again (CLIP's prompt
ensembling). An input's scores are its cosine similarities to the label vectors (times the
model's temperature, for CLIP). The label part takes any text encoder, so a sentence encoder
classifies texts the same way as CLIP classifies images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graft.errors import GraftError
from graft.tasks.image_text import dual_encoder, encode_images, encode_texts

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_prompts(labels: Sequence[str], templates: Sequence[str], command: str = "zero-shot") -> None:
    """Labels non-empty and distinct, every template with one {} for the label; errors begin with
    ``command`` (graft icl checks its labels here too)."""
    if not labels:
        raise GraftError(f"{command}: no labels given (--labels a,b,c)")
    blank = [i for i, label in enumerate(labels) if not label.strip()]
    if blank:
        raise GraftError(f"{command}: label {blank[0] + 1} is empty (--labels a,b,c)")
    seen = set()
    for label in labels:
        if label in seen:
            raise GraftError(f"{command}: label {label!r} is given twice")
        seen.add(label)
    if not templates:
        raise GraftError(f'{command}: no templates given (--templates "a photo of a {{}}.")')
    for template in templates:
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.count("}") != 1:
            raise GraftError(
                f"{command}: template {template!r} must hold the label's place once as {{}} "
                '(e.g. --templates "a photo of a {}.")'
            )


def label_embeddings(
    encode: Callable[[list[str]], torch.Tensor],
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """(L, P) one unit vector per label: the normalized mean of its normalized prompt embeddings.

    ``encode``: texts -> (N, P) embeddings (any text encoder: CLIP's text tower, a sentence encoder).
    """
    check_prompts(labels, templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    vectors = F.normalize(encode(prompts).float(), dim=-1)  # (L * K, P), label-major
    vectors = vectors.reshape(len(labels), len(templates), -1).mean(1)  # (L, P)
    return F.normalize(vectors, dim=-1)


def classify(
    embeddings: torch.Tensor, labels: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:  # (N, P), (L, P) -> (N, L)
    """Logits: scale x the cosine similarity of each input to each label vector."""
    return scale * F.normalize(embeddings.float(), dim=-1) @ labels.T


def zero_shot_images(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(N, L) a CLIP model's logits for each image and label (its logits_per_image against the
    label vectors); ``processor``: the model's ImageTextProcessor (graft.loading.load_processor)."""
    clip = dual_encoder(model, "zero-shot")
    label_vectors = label_embeddings(
        lambda texts: encode_texts(clip, processor.tokenizer, texts), labels, templates
    )
    image_vectors = encode_images(clip, processor.images, images, batch_size, names=names)
    return classify(image_vectors, label_vectors, float(clip.logit_scale.detach().exp()))


def predictions(logits: torch.Tensor, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One {label, score, scores} per row (softmax over the labels), as a classifier's predictions."""
    probs = logits.float().softmax(-1)  # (N, L)
    return [
        {
            "label": labels[int(row.argmax())],
            "score": float(row.max()),
            "scores": dict(zip(labels, row.tolist(), strict=True)),
        }
        for row in probs
    ]
