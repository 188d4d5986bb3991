"""Images in a JSON request: an image model's /predict (ViT, DeiT: graft predict's predictions;
CLIP: graft zeroshot's, against the request's labels) and a CLIP model's image embeddings.

An image is sent as its bytes, in a data URI (``data:image/png;base64,...``, what a browser's
FileReader gives) or as bare base64: the server fetches no URL (a request must not make it reach
other machines). graft.vision's ``open_image`` reads it as graft predict reads a file, with the
header first: an image over ``MAX_PIXELS`` is refused before its pixels are decoded, so a small
compressed file cannot make the server allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from graft.errors import GraftError
from graft.serve.http import HTTPError

MAX_PIXELS = 25_000_000  # 5000 x 5000: far above what any image model reads (224 x 224, 384 x 384)
DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,")


def decode_image(value: Any, where: str, param: str) -> Any:
    """A PIL image from a data URI or base64 text; a 422 naming ``where`` otherwise."""
    from graft.vision.images import open_image

    if not isinstance(value, str):
        raise HTTPError(
            422, f"{where}: an image is a data URI (data:image/png;base64,...) or base64 text", param
        )
    if value.startswith(("http://", "https://", "file:", "ftp:")):
        raise HTTPError(
            422, f"{where}: graft serve fetches no URL; send the image's bytes as a data URI", param
        )
    match = DATA_URI.match(value)
    try:
        data = base64.b64decode(value[match.end() :] if match else value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(422, f"{where}: not a data URI or base64 text", param) from None
    try:
        return open_image(data, where, MAX_PIXELS)
    except GraftError as e:
        raise HTTPError(422, str(e), param) from None


def image_records(inputs: list[Any], param: str) -> list[dict[str, Any]]:
    """/predict's inputs for an image model: each a record {"image": ..., "id": ...} or the image
    itself, its image decoded."""
    records = []
    for i, one in enumerate(inputs):
        record = dict(one) if isinstance(one, dict) else {"image": one}
        if "image" not in record:
            raise HTTPError(422, f"{param}[{i}]: a record needs 'image' (a data URI)", param)
        record["image"] = decode_image(record["image"], f"{param}[{i}].image", param)
        records.append(record)
    return records
