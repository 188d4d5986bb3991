"""An image model's preprocessing, read from its preprocessor_config.json (transformers' image
processors: resize with the checkpoint's resampling filter, center crop, rescale, normalize),
and the training augmentation of timm and torchvision (random resized crop, horizontal flip).

Written with Pillow and numpy only: the arithmetic is transformers' (Pillow resizes uint8 pixels,
then float64 rescaling, then float32 normalization), so pixel values equal theirs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError, did_you_mean
from graft.io.atomic import write_json
from graft.io.hf import read_json
from graft.vision.images import open_image, to_mode

log = logging.getLogger("graft")

PREPROCESSOR_FILE = "preprocessor_config.json"
# Training augmentation: a random resized crop and a flip (timm's and torchvision's), a flip alone, none
AUGMENTS = ("crop+flip", "flip", "none")
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # Pillow's codes


@dataclass
class ImageProcessor:
    """Images -> (B, C, H, W) pixel values for one model.

    ``size``: (height, width) to resize to, or ``shortest_edge`` (keep the aspect ratio), then
    ``crop`` (height, width) from the center. ``augment`` (one of AUGMENTS), in training
    (``train=True``): "crop+flip" is a random resized crop (``scale``, ``ratio`` as torchvision's
    RandomResizedCrop) to the output size and a horizontal flip with probability ``flip``; "flip"
    is the evaluation preprocessing and that flip; "none" is the evaluation preprocessing. Draws
    come from torch's global generator (seeded, and resumed, with the rest of training).
    """

    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    resample: int = 2  # Pillow's code: bilinear (ViT); CLIP's checkpoints say 3, bicubic
    do_resize: bool = True
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    std: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    channels: int = 3
    image_size: int | None = None  # what the model takes, checked when do_resize is false
    source: str = PREPROCESSOR_FILE  # where these values came from, for messages
    augment: str = "crop+flip"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    _converted: bool = field(default=False, repr=False, compare=False)  # the mode note was said

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise GraftError(
                f"augment: unknown value {self.augment!r} (one of {', '.join(AUGMENTS)})"
                f"{did_you_mean(str(self.augment), AUGMENTS)}"
            )
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise GraftError(
                f"crop_scale: expected [low, high] with 0 < low <= high <= 1 (shares of the image's area), got {list(self.scale)}"
            )

    @classmethod
    def for_model(cls, folder: str | Path | None, cfg: Any) -> ImageProcessor:
        """The processor of a model folder: its preprocessor_config.json, else the ViT defaults at
        the model's image size (resize to image_size x image_size, mean and std 0.5)."""
        path = Path(folder) / PREPROCESSOR_FILE if folder is not None else None
        if path is None or not path.exists():
            side = cfg.image_size
            return cls(size=(side, side), channels=cfg.num_channels, image_size=side, source=f"{cfg.family} defaults",
                       mean=(0.5,) * cfg.num_channels, std=(0.5,) * cfg.num_channels)  # fmt: skip
        return cls.from_dict(read_json(path), str(path), cfg.num_channels, cfg.image_size)

    @classmethod
    def from_dict(
        cls,
        d: dict[str, Any],
        source: str = PREPROCESSOR_FILE,
        channels: int = 3,
        image_size: int | None = None,
    ) -> ImageProcessor:
        """From transformers' preprocessor_config.json keys; a value out of place names the key."""
        size, shortest = sizes(d.get("size", 224), f"{source}: size")
        crop = sizes(d["crop_size"], f"{source}: crop_size")[0] if d.get("do_center_crop") else None
        resample = d.get("resample", 2)
        if resample not in RESAMPLE:
            raise GraftError(f"{source}: resample {resample!r} is not a Pillow filter code (0-5)")
        stats = {}
        for key in ("image_mean", "image_std"):
            value = d.get(key, 0.5)
            value = [value] * channels if isinstance(value, int | float) else value
            if (
                not isinstance(value, list | tuple)
                or len(value) != channels
                or not all(isinstance(v, int | float) for v in value)
            ):
                raise GraftError(
                    f"{source}: {key} must be {channels} numbers (one per channel), found {value!r}"
                )
            if key == "image_std" and not all(v > 0 for v in value):
                raise GraftError(f"{source}: image_std must be > 0, found {value!r}")
            stats[key] = tuple(float(v) for v in value)
        rescale = d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else None
        return cls(
            size=size,
            shortest_edge=shortest,
            resample=resample,
            do_resize=bool(d.get("do_resize", True)),
            crop=crop,
            rescale=float(rescale) if rescale is not None else None,
            mean=stats["image_mean"] if d.get("do_normalize", True) else None,
            std=stats["image_std"] if d.get("do_normalize", True) else None,
            channels=channels,
            image_size=image_size,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """preprocessor_config.json's keys (transformers' names), for a saved model."""
        d: dict[str, Any] = {
            "do_resize": self.do_resize,
            "size": {"shortest_edge": self.shortest_edge}
            if self.shortest_edge
            else dict(zip(("height", "width"), self.size or (0, 0), strict=True)),
            "resample": self.resample,
            "do_center_crop": self.crop is not None,
            "do_rescale": self.rescale is not None,
            "rescale_factor": self.rescale if self.rescale is not None else 1 / 255,
            "do_normalize": self.mean is not None,
            "image_mean": list(self.mean or (0.5,) * self.channels),
            "image_std": list(self.std or (0.5,) * self.channels),
            "image_processor_type": "CLIPImageProcessor" if self.crop else "ViTImageProcessor",
        }
        if self.crop:
            d["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        if self.channels == 3:
            d["do_convert_rgb"] = True
        return d

    def save(self, folder: str | Path) -> None:
        """preprocessor_config.json in ``folder`` (as a tokenizer saves its files beside a model)."""
        write_json(Path(folder) / PREPROCESSOR_FILE, self.to_dict())

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of what comes out, when fixed."""
        return self.crop or (self.size if not self.shortest_edge else None)

    def __call__(
        self, images: Sequence[Any], where: Sequence[str] | None = None, train: bool = False
    ) -> torch.Tensor:
        """(B, C, H, W) float32 pixel values; ``where`` names each image in errors (its file or record)."""
        where = where or [
            str(x) if isinstance(x, str | Path) else f"image {i + 1}" for i, x in enumerate(images)
        ]
        arrays = [self.one(image, w, train) for image, w in zip(images, where, strict=True)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise GraftError(
                f"{self.source}: images come out in {len(shapes)} sizes ({', '.join(str(s[1:]) for s in sorted(shapes))});"
                " a batch needs one: give the processor a size or crop_size"
            )
        return torch.from_numpy(np.stack(arrays))  # (B, C, H, W)

    def one(self, image: Any, where: str, train: bool = False) -> np.ndarray:
        """(C, H, W) float32 for one image."""
        pil = open_image(image, where)
        if pil.mode != ("RGB" if self.channels == 3 else "L"):
            if not self._converted:
                kind = "grayscale" if pil.mode in ("L", "LA", "I", "I;16", "F", "1") else pil.mode
                log.warning(
                    f"note: {kind} images are converted to {'RGB' if self.channels == 3 else 'grayscale'} for this "
                    f"{self.channels}-channel model (first: {where})"
                )
                self._converted = True
            pil = to_mode(pil, self.channels)
        if train and self.augment == "crop+flip" and self.output_size is not None:
            pil = self.random_resized_crop(pil)
            if torch.rand(()).item() < self.flip:
                pil = pil.transpose(0)  # Image.FLIP_LEFT_RIGHT
            x = np.asarray(pil)
        else:
            if self.do_resize:
                pil = pil.resize(self.resize_to(pil.height, pil.width)[::-1], resample=self.resample)
            x = np.asarray(pil)
            if self.crop:
                x = center_crop(x, *self.crop)
            if train and self.augment == "flip" and torch.rand(()).item() < self.flip:
                x = x[:, ::-1]  # (H, W[, C]) mirrored left to right
        if x.ndim == 2:
            x = x[:, :, None]  # (H, W, 1)
        side = self.image_size
        if side and not self.do_resize and x.shape[:2] != (side, side):
            raise GraftError(
                f"{where}: the image is {x.shape[1]}x{x.shape[0]} pixels but the model takes {side}x{side},"
                f" and {self.source} says do_resize: false (resize the images, or set do_resize: true there)"
            )
        x = x.transpose(2, 0, 1)  # (C, H, W)
        if self.rescale is not None:
            x = (x.astype(np.float64) * self.rescale).astype(np.float32)  # transformers' order of rounding
        x = x.astype(np.float32)
        if self.mean is not None:
            mean = np.array(self.mean, dtype=np.float32)[:, None, None]
            std = np.array(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x)

    def resize_to(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: the fixed size, or the short side to shortest_edge."""
        if not self.shortest_edge:
            return self.size
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def random_resized_crop(self, image: Any) -> Any:
        """torchvision's RandomResizedCrop: a random area and aspect ratio, resized to the output size."""
        W, H = image.size
        area = H * W
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            target = area * torch.empty(()).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(()).uniform_(*log_ratio).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= W and 0 < h <= H:
                top = int(torch.randint(0, H - h + 1, ()).item())
                left = int(torch.randint(0, W - w + 1, ()).item())
                box = (left, top, left + w, top + h)
                break
        if box is None:  # the whole image, cut to the nearest allowed aspect ratio
            ratio = W / H
            w, h = (
                (W, round(W / self.ratio[0]))
                if ratio < self.ratio[0]
                else ((round(H * self.ratio[1]), H) if ratio > self.ratio[1] else (W, H))
            )
            box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
        height, width = self.output_size
        return image.resize((width, height), resample=self.resample, box=box)


def sizes(value: Any, where: str) -> tuple[tuple[int, int] | None, int | None]:
    """A size as preprocessor configs write it: an int, {height, width} or {shortest_edge}."""
    if type(value) is int and value > 0:
        return (value, value), None
    if isinstance(value, dict):
        if type(value.get("shortest_edge")) is int and value["shortest_edge"] > 0:
            return None, value["shortest_edge"]
        h, w = value.get("height"), value.get("width")
        if type(h) is int and type(w) is int and h > 0 and w > 0:
            return (h, w), None
    raise GraftError(
        f"{where} must be a positive int, {{height, width}} or {{shortest_edge}}, found {value!r}"
    )


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The center (height, width) of an (H, W[, C]) array, zero-padded when smaller (transformers' rule)."""
    H, W = x.shape[:2]
    if H < height or W < width:
        padded = np.zeros((max(H, height), max(W, width), *x.shape[2:]), dtype=x.dtype)
        top, left = math.ceil((padded.shape[0] - H) / 2), math.ceil((padded.shape[1] - W) / 2)
        padded[top : top + H, left : left + W] = x
        x, H, W = padded, *padded.shape[:2]
    top, left = (H - height) // 2, (W - width) // 2
    return x[top : top + height, left : left + width]
