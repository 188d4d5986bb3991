"""Reading images: a file path or a record's array -> a Pillow image, with one-line errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from graft.data.readers import missing_path_error
from graft.errors import GraftError


def pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise GraftError("reading images needs Pillow: pip install 'graft-ml[data]'") from None
    return Image


def open_image(value: Any, where: str = "image", max_pixels: int | None = None) -> Any:
    """A loaded PIL image from a path (str or Path), a file's bytes, or a uint8 array (H, W) /
    (H, W, 3|4).

    A missing, unreadable or truncated file is a GraftError naming the file (``where`` for bytes);
    Pillow's lazy reading is forced here, so a broken file fails now, not in the middle of a batch.
    ``max_pixels``: a larger image is refused from its header, before its pixels are decoded.
    """
    Image = pillow()
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, bytes):
        return _decoded(io.BytesIO(value), where, max_pixels)
    if isinstance(value, np.ndarray):
        if (
            value.dtype != np.uint8
            or value.ndim not in (2, 3)
            or (value.ndim == 3 and value.shape[2] not in (1, 3, 4))
        ):
            raise GraftError(
                f"{where}: expected a uint8 image array (H, W) or (H, W, 1|3|4), got {value.dtype} {value.shape}"
            )
        return Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value)
    if not isinstance(value, str | Path):
        raise GraftError(f"{where}: expected an image file path or an image, got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        raise (
            missing_path_error(path)
            if not path.exists()
            else GraftError(f"{path}: is a folder; expected an image file")
        )
    return _decoded(path, str(path), max_pixels)


def _decoded(source: Any, name: str, max_pixels: int | None) -> Any:
    Image = pillow()
    try:
        with Image.open(source) as image:  # the header only, so far
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise GraftError(f"{name}: {width} x {height} pixels; graft reads at most {max_pixels:,}")
            image.load()  # decode now: a truncated file raises here
            return image.copy() if image.mode not in ("P", "PA") else image.convert("RGBA")
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
    ) as error:  # UnidentifiedImageError is an OSError
        raise GraftError(f"{name}: cannot read the image ({error})") from None


def to_mode(image: Any, channels: int) -> Any:
    """``image`` in the mode a model of ``channels`` channels reads: RGB (transparency over white,
    as transformers' convert_to_rgb does) or L."""
    Image = pillow()
    if channels == 1:
        return image if image.mode == "L" else image.convert("L")
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
