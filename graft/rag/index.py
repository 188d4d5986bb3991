"""A RAG index (chapter 10): a corpus's chunks, their unit-length embeddings, and the embedder's name.

An index is a folder written whole (atomically) by ``build`` + ``save``:

- manifest.json: the embedder (its folder), its pooling, the chunking, the counts, and ``probe``,
  the embedding of a fixed sentence: a query model whose probe differs is another embedder, whatever
  its folder is called (a moved copy of the same model passes);
- chunks.jsonl: one chunk a line ({"source", "start", "end", "text"});
- embeddings.npy: (chunks, dim) float32, unit rows, so a dot product is the cosine.

Search is exact: one matrix-vector product in numpy; with faiss installed and at least
``FAISS_ROWS`` chunks, faiss's flat inner-product index (exact too, and multi-threaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft.errors import GraftError
from graft.rag.corpus import Chunk, Document, chunk, read_file

MANIFEST, CHUNKS, EMBEDDINGS = "manifest.json", "chunks.jsonl", "embeddings.npy"
FORMAT = 1
PROBE = "graft rag: the sentence that tells one embedder from another."
SAME_EMBEDDER = 0.999  # cosine of the probe's two embeddings: kernels vs reference differ by ~1e-6
FAISS_ROWS = 20_000


class Embedder:
    """A sentence encoder (a HF folder): unit-length mean-pooled embeddings, as graft embed --normalize."""

    pooling = "mean"

    def __init__(self, model: str | Path, kernels: bool = True) -> None:
        from graft.io.hf import resolve
        from graft.loading import load_model
        from graft.tokenizer import Tokenizer

        self.folder = resolve(model).resolve()
        self.model = load_model(self.folder, task="base", kernels=kernels)
        if not hasattr(self.model, "embed"):  # an encoder-decoder or CLIP: no one stack to pool
            raise GraftError(f"{model}: a {self.model.config.family} model is not a sentence encoder")
        self.tokenizer = Tokenizer.from_folder(self.folder)

    def limit(self) -> int:
        """The most tokens one text may have, special tokens included."""
        from graft.tasks.collate import window

        return window(self.model.config, self.tokenizer)

    def special_tokens(self) -> int:
        """How many special tokens the tokenizer adds to a text ([CLS] and [SEP]: 2)."""
        return len(self.tokenizer.encode("", return_tensors=None, padding=False).input_ids[0])

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, D) float32 unit rows."""
        from graft.tasks.embedding import embed

        return embed(self.model, self.tokenizer, texts, normalize=True).numpy().astype(np.float32)


@dataclass
class Hit:
    id: int  # the chunk's row in the index
    score: float  # cosine to the query (or, reranked, the cross-encoder's score)
    chunk: Chunk


@dataclass
class Index:
    manifest: dict[str, Any]
    chunks: list[Chunk]
    vectors: np.ndarray  # (N, D) float32 unit rows
    folder: Path | None = None
    _faiss: Any = field(default=None, repr=False)

    def save(self, folder: Path) -> None:
        """Write the index folder whole: the old one stays until the new one is complete."""
        from graft.io.atomic import atomic_folder, write_json

        with atomic_folder(folder) as tmp:
            np.save(tmp / EMBEDDINGS, self.vectors)
            lines = "".join(json.dumps(c.row(), ensure_ascii=False) + "\n" for c in self.chunks)
            (tmp / CHUNKS).write_text(lines, encoding="utf-8")
            write_json(tmp / MANIFEST, self.manifest)
        self.folder = folder

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` chunks nearest to ``query`` (D,), best first (ties: the earlier chunk)."""
        k = min(k, len(self.chunks))
        query = query.astype(np.float32)
        if len(self.chunks) >= FAISS_ROWS and faiss_module() is not None:
            if self._faiss is None:
                self._faiss = faiss_module().IndexFlatIP(self.vectors.shape[1])
                self._faiss.add(self.vectors)
            scores, ids = self._faiss.search(query[None], k)  # (1, k) each
            pairs = zip(ids[0].tolist(), scores[0].tolist(), strict=True)
        else:
            scores = self.vectors @ query  # (N,) cosines
            top = np.argsort(-scores, kind="stable")[:k]
            pairs = zip(top.tolist(), scores[top].tolist(), strict=True)
        return [Hit(i, float(s), self.chunks[i]) for i, s in pairs]

    def check_embedder(self, embedder: Embedder) -> None:
        """Refuse a query model that is not the embedder the index was built with."""
        probe = embedder.embed([PROBE])[0]
        saved = np.asarray(self.manifest["probe"], dtype=np.float32)
        if probe.shape != saved.shape or float(probe @ saved) < SAME_EMBEDDER:
            where = self.folder or "the index"
            raise GraftError(
                f"{where}: built with the embedder {self.manifest['embedder']}, and {embedder.folder} is another "
                f"model (its embeddings differ); query with the index's embedder, or rebuild the index: "
                f"graft rag index DOCS... --model {embedder.folder} --out {where}"
            )


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build(embedder: Embedder, documents: list[Document], size: int, overlap: int) -> Index:
    """Chunk every document with the embedder's tokenizer and embed the chunks."""
    limit = embedder.limit() - embedder.special_tokens()
    if size > limit:
        raise GraftError(
            f"rag index: --chunk-tokens {size} is more than the embedder's {limit} tokens a text "
            f"(give --chunk-tokens {limit} or fewer)"
        )
    chunks = [c for d in documents for c in chunk(d, embedder.tokenizer, size, overlap)]
    if not chunks:
        raise GraftError("rag index: the corpus is empty (its documents hold no tokens)")
    vectors = embedder.embed([c.text for c in chunks])
    manifest = {
        "format": FORMAT,
        "embedder": str(embedder.folder),
        "pooling": embedder.pooling,
        "normalized": True,
        "dim": int(vectors.shape[1]),
        "chunk_tokens": size,
        "overlap": overlap,
        "documents": len(documents),
        "chunks": len(chunks),
        "probe": embedder.embed([PROBE])[0].tolist(),
    }
    return Index(manifest, chunks, vectors)


def load(folder: Path) -> Index:
    """Read an index folder, checking its three files against each other."""
    from graft.io.hf import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise GraftError(f"{folder}: index folder not found (graft rag index ... --out {folder} writes one)")
    path = folder / MANIFEST
    if not path.is_file():
        raise GraftError(
            f"{folder}: not a graft rag index ({MANIFEST} not found; graft rag index writes one)"
        )
    manifest = read_json(path)
    kinds = {"format": int, "embedder": str, "dim": int, "chunks": int, "probe": list}
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            raise GraftError(
                f"{path}: {key!r} is missing or not a {kind.__name__} (rebuild the index with graft rag index)"
            )
    if manifest["format"] != FORMAT:
        raise GraftError(
            f"{path}: format {manifest['format']} is not {FORMAT} (rebuild the index with graft rag index)"
        )
    count, dim = manifest["chunks"], manifest["dim"]
    chunks = read_chunks(folder / CHUNKS)
    if len(chunks) != count:
        raise GraftError(
            f"{folder / CHUNKS}: {len(chunks)} chunks, the manifest says {count} (rebuild the index)"
        )
    try:  # memory-mapped: a header that claims more rows than the file holds fails here, unallocated
        array = np.load(folder / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise GraftError(
            f"{folder / EMBEDDINGS}: file not found (rebuild the index with graft rag index)"
        ) from None
    except (OSError, ValueError) as e:
        raise GraftError(f"{folder / EMBEDDINGS}: cannot read ({' '.join(str(e).split())})") from None
    if array.shape != (count, dim) or array.dtype != np.float32:
        raise GraftError(
            f"{folder / EMBEDDINGS}: {array.dtype} {tuple(array.shape)}, expected float32 ({count}, {dim}) "
            "as the manifest says (rebuild the index)"
        )
    return Index(manifest, chunks, np.array(array), folder)


def read_chunks(path: Path) -> list[Chunk]:
    data = read_file(path, "file not found (rebuild the index with graft rag index)")
    chunks = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            row = json.loads(line)
            chunks.append(Chunk(str(row["source"]), int(row["start"]), int(row["end"]), str(row["text"])))
        except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise GraftError(
                f"{path}: line {number}: not a chunk (expected source, start, end and text; rebuild the index)"
            ) from None
    return chunks
