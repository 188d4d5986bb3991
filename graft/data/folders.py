"""Classification data laid out as files: a folder with one sub-folder per class (text files or
images), and IDX arrays (the MNIST / Fashion-MNIST format).

A record's key is its index in the sorted file list (folders) or its row in the array (IDX), so a
dataset keeps file names, not file contents, and reads each file when asked for it.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from graft.data.readers import Source, check_file, missing_path_error
from graft.data.records import BadRow, LoadStats, Record, logger
from graft.errors import GraftError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def class_folders(path: str | Path) -> list[Path]:
    """The class sub-folders of ``path``, sorted by name."""
    root = Path(path)
    if not root.exists():
        raise missing_path_error(root)
    if not root.is_dir():
        raise GraftError(f"{root}: expected a folder with one sub-folder per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise GraftError(f"{root}: no class sub-folders (expected one per class, e.g. {root}/positive/1.txt)")
    return classes


class _FolderSource(Source):
    """One record per file, its label the name of the class sub-folder the file is in."""

    suffixes: set[str] | None = None  # the file types to read; None reads every file

    def __init__(self, path: str | Path, options: Any = None) -> None:
        super().__init__(path, options)
        self.files: list[tuple[Path, str]] = []  # (file, label), sorted

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        self.files = [
            (file, folder.name)
            for folder in class_folders(self.path)
            for file in sorted(folder.rglob("*"))
            if file.is_file()
            and not file.name.startswith(".")
            and (self.suffixes is None or file.suffix.lower() in self.suffixes)
        ]
        if not self.files:
            kinds = "image files" if self.suffixes else "files"
            raise GraftError(f"{self.path}, row 0: empty folder (no {kinds} in its class sub-folders)")
        fallbacks: list[tuple[Path, str]] = []  # (file, encoding) of each file read as other than UTF-8
        for key, (file, _) in enumerate(self.files):
            try:
                record, codec = self._read(key)
            except BadRow as error:
                stats.bad(error)
                continue
            if codec is not None:
                fallbacks.append((file, codec))
            yield key, f"{file}, row {key}", record
        if fallbacks:
            first, codec = fallbacks[0]
            logger.warning(
                f"note: {len(fallbacks)} of the {len(self.files)} files of {self.path} "
                f"{'is' if len(fallbacks) == 1 else 'are'} not UTF-8 and {'was' if len(fallbacks) == 1 else 'were'} "
                f"read as {codec} (first: {self._id(first)}); name the encoding with --encoding "
                "(data.encoding in a recipe) to read them otherwise"
            )

    def load(self, key: int) -> Record:
        return self._read(key)[0]

    def _read(self, key: int) -> tuple[Record, str | None]:
        """The record at ``key``, and the encoding it fell back to when its file is not UTF-8."""
        raise NotImplementedError

    def _id(self, file: Path) -> str:
        return file.relative_to(self.path).as_posix()


class TextFolderSource(_FolderSource):
    """Text files: ``root/<label>/<any name>``. With encoding 'auto' a file is read as UTF-8, or as
    cp1252 when it is not UTF-8 (old English corpora, BBC News among them, are Windows-1252)."""

    format = "textfolder"

    def _read(self, key: int) -> tuple[Record, str | None]:
        file, label = self.files[key]
        raw = file.read_bytes()
        text, bad = self.decode(raw)
        codec = None
        if bad is not None and self.options.encoding == "auto":
            # cp1252 leaves five bytes undefined; latin-1 decodes any byte
            codec = "cp1252" if not _undefined_in_cp1252(raw) else "latin-1"
            text, bad = raw.decode(codec), None
        if bad is not None:
            line = raw.count(b"\n", 0, bad) + 1
            raise self.bad_text(f"{file}, line {line}", "text", raw[bad], bad)
        if not text.strip():
            raise BadRow("empty file", f"{file}, line 1, column 'text': empty file")
        return {"text": text.removeprefix("\ufeff"), "label": label, "id": self._id(file)}, codec


def _undefined_in_cp1252(raw: bytes) -> bool:
    return any(byte in raw for byte in (b"\x81", b"\x8d", b"\x8f", b"\x90", b"\x9d"))


class ImageFolderSource(_FolderSource):
    """Images read with Pillow: ``root/<label>/<name>.png`` (or .jpg, .bmp, .gif, .webp, .tif)."""

    format = "imagefolder"
    suffixes = IMAGE_SUFFIXES

    def _read(self, key: int) -> tuple[Record, str | None]:
        file, label = self.files[key]
        return {"image": read_image(file, f"{file}, row {key}"), "label": label, "id": self._id(file)}, None


def read_image(file: Path, where: str) -> np.ndarray:
    """A uint8 array: (H, W) for grayscale, (H, W, 3) for colour, (H, W, 4) with transparency."""
    try:
        from PIL import Image
    except ImportError:
        raise GraftError(f"{file}: reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(file) as image:
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("L" if image.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
            return np.asarray(image, dtype=np.uint8)
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
    ) as error:  # UnidentifiedImageError is an OSError
        raise BadRow(
            "unreadable image", f"{where}, column 'image': cannot read the image ({error})"
        ) from None


# IDX: a 4-byte magic (0, 0, type code, number of dimensions), one big-endian uint32 per
# dimension, then the values in C order.
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array: memory-mapped when the file is raw, read into memory when it is gzipped."""
    path = str(path)
    check_file(path)
    gzipped = path.endswith(".gz")
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES:
                raise GraftError(f"{path}, byte 0: not an IDX file (magic bytes {magic.hex() or 'missing'})")
            shape = struct.unpack(f">{magic[3]}I", f.read(4 * magic[3]))
            dtype = np.dtype(_IDX_TYPES[magic[2]])
            header, size = 4 + 4 * len(shape), math.prod(shape) * dtype.itemsize
            if gzipped:
                data = f.read()
                if len(data) != size:
                    raise GraftError(
                        f"{path}, byte {header}: {len(data)} bytes of data, the header says {size}"
                    )
                return np.frombuffer(data, dtype).reshape(shape)
    except (OSError, EOFError, struct.error) as error:  # gzip.BadGzipFile is an OSError
        raise GraftError(f"{path}, byte 0: not a readable IDX file ({error})") from None
    found = Path(path).stat().st_size - header
    if found != size:
        raise GraftError(f"{path}, byte {header}: {found} bytes of data, the header says {size}")
    return np.memmap(path, dtype, "r", offset=header, shape=shape)


def idx_labels_path(images: str | Path) -> Path:
    """The labels file that pairs with an images file: train-images-idx3-ubyte -> train-labels-idx1-ubyte."""
    images = Path(images)
    if "images" not in images.name:
        raise GraftError(f"{images}: expected an IDX images file named like 'train-images-idx3-ubyte.gz'")
    return images.with_name(images.name.replace("images", "labels").replace("idx3", "idx1"))


class IdxSource(Source):
    """IDX images with the labels file beside them; the key is the row number (from 0)."""

    format = "idx"

    def scan(self, stats: LoadStats) -> Iterator[tuple[int, str, Record]]:
        images, _ = self._arrays()
        for row in range(len(images)):
            yield row, f"{self.path}, row {row}", self.load(row)

    def load(self, key: int) -> Record:
        images, labels = self._arrays()
        return {"image": np.array(images[key]), "label": str(int(labels[key]))}

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._handle is None:
            labels_path = idx_labels_path(self.path)
            if not labels_path.exists():
                raise GraftError(f"{self.path}: no labels file beside it (looked for {labels_path.name})")
            images, labels = read_idx(self.path), read_idx(labels_path)
            if images.ndim not in (3, 4) or images.dtype != np.uint8:
                raise GraftError(
                    f"{self.path}, byte 0, column 'image': expected uint8 images of shape (N, H, W) or "
                    f"(N, H, W, C), got {images.dtype} {images.shape}"
                )
            if labels.ndim != 1 or len(labels) != len(images):
                raise GraftError(
                    f"{labels_path}, row {min(len(labels), len(images))}, column 'label': "
                    f"{len(labels)} labels for {len(images)} images in {Path(self.path).name}"
                )
            self._handle = (images, labels)
        return self._handle
