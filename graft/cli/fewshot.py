"""``graft zeroshot MODEL --labels a,b --text ...`` for texts (graft/cli/vision.py holds the command;
images go to CLIP there): a sentence encoder compares each text to the labels' descriptions, a
causal LM scores the labels' verbalizers after a prompt, calibrated (graft.fewshot.verbalizer).

    graft zeroshot all-MiniLM-L6-v2 --labels sport,tech --descriptions "tech=computers and phones" --text "..."
    graft zeroshot SmolLM2 --labels sport,tech --verbalizers sport=football --data news.csv --chat
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from graft.errors import GraftError


def read_texts(
    texts: list[str] | None, data: Path | None, fmt: str | None, columns: list[str] | None
) -> list[dict[str, Any]]:
    """The records to classify: each --text, or the rows of --data (a ``text`` column, as predict reads)."""
    from graft.cli.tasks import parse_columns
    from graft.data import load_records

    if bool(texts) == (data is not None):
        raise GraftError("zeroshot: give texts with --text (one or more) or --data FILE, not both")
    if texts:
        return [{"text": t} for t in texts]
    records = list(load_records(data, fmt, parse_columns(columns), required=("text",), ignore=("label",)))
    if not records:
        raise GraftError(f"{data}: no records to classify")
    return records


def zeroshot_texts(
    model: str,
    labels: list[str],
    texts: list[str] | None,
    data: Path | None,
    fmt: str | None,
    columns: list[str] | None,
    descriptions: list[str] | None,
    verbalizers: list[str] | None,
    templates: list[str] | None,
    prompt: str | None,
    calibrate: bool,
    chat: bool,
    max_length: int | None,
    batch_size: int,
    reference: bool,
) -> None:
    """Print one JSON line per text: its record and {label, score, scores}, as graft predict does."""
    from graft.fewshot.verbalizer import (
        DEFAULT_TEMPLATE,
        causal_lm_scores,
        check_template,
        encoder_scores,
        label_texts,
        text_model_kind,
    )
    from graft.io.hf import resolve
    from graft.loading import load_config, load_model
    from graft.tasks.predict import prediction_row
    from graft.tasks.zeroshot import check_prompts, predictions
    from graft.tokenizer import Tokenizer

    check_prompts(labels, templates or ["{}"])
    folder = resolve(model)
    family, _ = load_config(folder)
    kind = text_model_kind(family, model)
    wrong = {"encoder": ("--verbalizers", verbalizers or prompt or chat), "causal-lm": ("--descriptions", descriptions or templates)}  # fmt: skip
    option, given = wrong[kind]
    if given:
        what = (
            "a sentence encoder, which compares texts to --descriptions"
            if kind == "encoder"
            else "a causal LM, which scores --verbalizers after --prompt"
        )
        raise GraftError(f"zeroshot: {model} is {what}; the options for the other kind (such as {option}) do not apply")  # fmt: skip
    if kind == "causal-lm":
        words = label_texts(labels, verbalizers, "--verbalizers", "verbalizer")
        check_template(prompt or DEFAULT_TEMPLATE, "--prompt")
    else:
        words = label_texts(labels, descriptions, "--descriptions", "description", every=False)
    records = read_texts(texts, data, fmt, columns)  # before the model loads
    tokenizer = Tokenizer.from_folder(folder)
    m = load_model(folder, task="causal-lm" if kind == "causal-lm" else "base", kernels=not reference).eval()
    inputs = [r["text"] for r in records]
    if kind == "causal-lm":
        scores = causal_lm_scores(
            m, tokenizer, inputs, words, prompt or DEFAULT_TEMPLATE, calibrate, max_length, batch_size, chat
        )
    else:
        # cosines x 20, the temperature sentence encoders are trained at (MultipleNegativesRankingLoss)
        scores = 20 * encoder_scores(m, tokenizer, inputs, words, templates or ["{}"], max_length, batch_size)
    for record, prediction in zip(records, predictions(scores, labels), strict=True):
        row = {"text": record["text"], **prediction} if texts else prediction_row(record, prediction)
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
