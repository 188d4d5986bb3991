"""``graft zeroshot MODEL --labels a,b --text ...`` for texts (graft/cli/vision.py holds the command;
images go to CLIP there): a sentence encoder compares each text to the labels' descriptions, a
causal LM scores the labels' verbalizers after a prompt, calibrated (graft.fewshot.verbalizer);
and ``graft setfit RECIPE --out FOLDER``: SetFit on the recipe's data (graft.fewshot.setfit).

    graft zeroshot all-MiniLM-L6-v2 --labels sport,tech --descriptions "tech=computers and phones" --text "..."
    graft zeroshot SmolLM2 --labels sport,tech --verbalizers sport=football --data news.csv --chat
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import app
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
    records = read_texts(texts, data, fmt, columns)  # before the model loads
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


@app.command()
def setfit(
    recipe: Annotated[Path, typer.Argument(help="A classification recipe: its model (a sentence encoder), data, optimizer.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Recipe keys to change, e.g. optim.lr=2e-5.")] = None,
    out: Annotated[Path, typer.Option(help="The SetFit folder to write: the tuned encoder and its head.")] = Path("setfit"),
    per_class: Annotated[int | None, typer.Option(min=1, help="Train on this many examples of each class (seeded by train.seed).")] = None,
    iterations: Annotated[int, typer.Option(min=1, help="Rounds of one positive and one negative pair per example.")] = 20,
    max_pairs: Annotated[int | None, typer.Option(min=2, help="At most this many pairs (a seeded sample).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:  # fmt: skip
    """SetFit: contrastive fine-tuning of a sentence encoder on pairs of the training split, then a
    logistic-regression head; prints the test accuracy (when the recipe has a test split) as JSON."""
    from graft.data import load_splits
    from graft.fewshot.curve import accuracy
    from graft.fewshot.curve import per_class as draw
    from graft.fewshot.setfit import train_setfit
    from graft.io.atomic import check_output
    from graft.train.config import load_recipe, with_overrides

    check_output(out, "--out", folder=True, overwrite=overwrite)
    config = load_recipe(recipe, overrides or [])
    if config.task.name != "classification" or config.data.label_kind != "class":
        raise GraftError(f"setfit: the recipe's task is {config.task.name} ({config.data.label_kind} labels); SetFit needs single-label classification")  # fmt: skip
    splits = load_splits(config.data)
    train = [(r["text"], str(r["label"])) for r in splits["train"]]
    train = [train[i] for i in draw([label for _, label in train], per_class, config.train.seed)]
    classes = sorted({label for _, label in train})
    run = with_overrides(config, {"checkpoint.keep": 0, "checkpoint.save_model": False, "train.plots": False})
    tuned = train_setfit(
        run, [t for t, _ in train], [label for _, label in train], classes, iterations, False, max_pairs
    )
    tuned.save(out)
    result: dict[str, Any] = {"examples": len(train), "out": str(out)}
    if "test" in splits:
        test = [(r["text"], str(r["label"])) for r in splits["test"]]
        result["test/accuracy"] = round(
            accuracy(tuned.predict([t for t, _ in test]), [label for _, label in test]), 4
        )
    typer.echo(json.dumps(result))
