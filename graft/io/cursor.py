"""A reader of a binary file front to back, every read checked against the bytes that remain: a
header can never ask for more than the file holds (GGUF, CTranslate2)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from graft.errors import GraftError


class Cursor:
    """Reads ``buf`` from offset 0; ``kind`` names the format in the errors ("GGUF")."""

    kind = "binary"

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise GraftError(
                f"{self.path}: truncated or corrupt {self.kind} file: {what} needs {n:,} bytes at offset "
                f"{self.pos:,}, but only {left:,} remain"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value
