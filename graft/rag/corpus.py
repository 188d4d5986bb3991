"""A RAG corpus (chapter 10): documents read from files, cut into overlapping chunks of tokens.

Documents are text (.txt), Markdown (.md, .markdown) or JSON lines (.jsonl: one document per line,
``{"text": ..., "id": ...}``, the id optional). A folder stands for the documents in it, at any
depth. Chunks are windows of at most ``size`` tokens of the embedder's own tokenizer, each sharing
``overlap`` tokens with the next (a few more where a word would be cut: windows start and end at
word boundaries), the last ending at the document's end; a chunk's text is the document's
characters from its first token's start to its last token's end, so it tokenizes back to its window.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.errors import GraftError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")


@dataclass
class Document:
    source: str  # the file as given (a JSONL line: its "id", else FILE:LINE)
    text: str


@dataclass
class Chunk:
    source: str
    start: int  # character offsets into the document's text: text == document.text[start:end]
    end: int
    text: str

    def row(self) -> dict[str, Any]:
        return {"source": self.source, "start": self.start, "end": self.end, "text": self.text}


def document_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(the files to read, the files of other types found in the folders given); a file given by name
    is read whatever its suffix (as text, unless it ends in .jsonl)."""
    files: list[Path] = []
    others: list[Path] = []
    for path in paths:
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                (files if f.suffix.lower() in SUFFIXES else others).append(f)
        elif path.is_file():
            files.append(path)
        else:
            raise GraftError(f"{path}: file not found")
    return files, others


def read_file(path: Path, missing: str = "file not found") -> bytes:
    """The bytes of ``path``, or a one-line GraftError naming it (``missing`` when it is not there)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GraftError(f"{path}: {missing}") from None
    except OSError as e:
        raise GraftError(f"{path}: cannot read ({e.strerror or e})") from None


def read_documents(path: Path) -> list[Document]:
    """The documents in one file: the whole text, or one per JSON line."""
    data = read_file(path)
    if path.suffix.lower() != ".jsonl":
        try:
            return [Document(str(path), data.decode("utf-8"))]
        except UnicodeDecodeError as e:
            raise GraftError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    documents = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            raise GraftError(f"{path}: line {number}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise GraftError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise GraftError(
                f'{path}: line {number}: expected an object with a "text" string, as {{"text": "..."}}'
            )
        name = record.get("id")
        documents.append(Document(str(name) if name is not None else f"{path}:{number}", record["text"]))
    return documents


def read_corpus(paths: Iterable[Path]) -> tuple[list[Document], list[Path]]:
    """(every document with some text, the files of other types skipped in folders); an empty corpus
    is an error."""
    paths = list(paths)
    files, skipped = document_files(paths)
    documents = [d for f in files for d in read_documents(f) if d.text.strip()]
    if not documents:
        given = ", ".join(str(p) for p in paths) or "nothing"
        kinds = ", ".join(SUFFIXES)
        raise GraftError(f"rag index: the corpus is empty (no text in {given}; documents are {kinds} files)")
    return documents, skipped


def spans(count: int, size: int, overlap: int, starts: list[bool] | None = None) -> list[tuple[int, int]]:
    """Token windows [start, end) over ``count`` tokens: at most ``size`` long, each sharing
    ``overlap`` tokens with the next, the first starting at 0 and the last ending at ``count``.

    Without ``starts``, every window but the last is exactly ``size`` long and every overlap exactly
    ``overlap``. ``starts[i]``: token i begins a word; then windows start and end at word starts: an
    end moves back to the start of the word it would cut, a start back to its word's first token
    (a longer overlap) or, when that is not after the previous start, forward to the next word's
    (a shorter one). Only a word longer than a window is cut.
    """
    if not 0 <= overlap < size:
        raise GraftError(f"rag index: --overlap {overlap} must be at least 0 and below --chunk-tokens {size}")

    def boundary(i: int, low: int, high: int) -> int:
        """The word start nearest before i (above low), else after it (up to high), else i."""
        if starts is None:
            return i
        for j in range(i, low, -1):
            if starts[j]:
                return j
        return next((j for j in range(i + 1, high + 1) if starts[j]), i)

    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + size, count)
        if end < count:  # end where the next word begins, the window not empty
            end = boundary(end, start, end)
        windows.append((start, end))
        if end == count:
            return windows
        # the next window starts overlap tokens back, at a word's start; always forward
        start = boundary(max(end - overlap, start + 1), start, end)


def chunk(document: Document, tokenizer: Any, size: int, overlap: int) -> list[Chunk]:
    """The document cut into windows of at most ``size`` tokens (of ``tokenizer``) at word boundaries,
    overlapping by ``overlap`` tokens or a few more (``spans``)."""
    enc = tokenizer.encode(
        document.text, add_special_tokens=False, truncation=False, padding=False, return_tensors=None
    )
    offsets = enc.offsets[0]  # (start, end) characters of each token
    if not offsets:  # nothing but characters the tokenizer drops (control characters...)
        return []
    words = enc.word_ids[0]
    starts = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(len(words))]
    chunks = []
    for first, last in spans(len(offsets), size, overlap, starts):
        start, end = offsets[first][0], offsets[last - 1][1]
        chunks.append(Chunk(document.source, start, end, document.text[start:end]))
    return chunks
