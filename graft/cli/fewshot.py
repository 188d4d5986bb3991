"""``graft zeroshot MODEL --labels a,b --text ...`` for texts (graft/cli/vision.py holds the command;
images go to CLIP there): a sentence encoder compares each text to the labels' descriptions, a
causal LM scores the labels' verbalizers after a prompt, calibrated (graft.fewshot.verbalizer);
``graft icl CHAT_MODEL --examples FILE --labels a,b --text ...``: in-context few-shot, k examples per
class in a chat model's prompt, the answer scored over the labels (graft.fewshot.icl); and
``graft setfit RECIPE --out FOLDER``: SetFit on the recipe's data (graft.fewshot.setfit).

    graft zeroshot all-MiniLM-L6-v2 --labels sport,tech --descriptions "tech=computers and phones" --text "..."
    graft zeroshot SmolLM2 --labels sport,tech --verbalizers sport=football --data news.csv --chat
    graft icl SmolLM2-135M-Instruct --examples train.csv --labels sport,tech --k 2 --data news.csv
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import ReferenceOpt, app
from graft.errors import GraftError, did_you_mean


def read_texts(
    texts: list[str] | None,
    data: Path | None,
    fmt: str | None,
    columns: list[str] | None,
    command: str = "zeroshot",
) -> list[dict[str, Any]]:
    """The records to classify: each --text, or the rows of --data (a ``text`` column, as predict
    reads; a label column is not read, so a --column naming one applies to other files only)."""
    from graft.cli.tasks import parse_columns
    from graft.data import load_records

    if bool(texts) == (data is not None):
        raise GraftError(f"{command}: give texts with --text (one or more) or --data FILE, not both")
    if texts:
        return [{"text": t} for t in texts]
    mapping = {source: key for source, key in parse_columns(columns).items() if key != "label"}
    records = list(load_records(data, fmt, mapping, required=("text",), ignore=("label",)))
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
    from graft.tasks.zeroshot import check_prompts
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
    write_predictions(records, scores, labels, bool(texts))


def write_predictions(records: list[dict[str, Any]], scores: Any, labels: list[str], texts: bool) -> None:
    """One JSON line per record, {label, score, scores} (softmax of ``scores``, (N, L), over the
    labels) after the text (--text) or the record's id (--data), as graft predict writes."""
    from graft.tasks.predict import prediction_row
    from graft.tasks.zeroshot import predictions

    for record, prediction in zip(records, predictions(scores, labels), strict=True):
        row = {"text": record["text"], **prediction} if texts else prediction_row(record, prediction)
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_examples(path: Path, columns: list[str] | None, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The labelled examples (text and label columns, its format from its name), every label one of
    ``labels`` (the error names the file, line and column) and every class with at least k of them."""
    from collections import Counter

    from graft.cli.tasks import parse_columns
    from graft.data import load_records
    from graft.data.records import quoted

    stream = load_records(path, None, parse_columns(columns), required=("text", "label"))
    examples = []
    for _, where, record in stream.source.scan(stream.stats):
        if record["label"] not in labels:
            raise GraftError(
                f"{where}, column {quoted([stream.source.column('label')])}: label {record['label']!r} is not "
                f"one of --labels ({', '.join(labels)}){did_you_mean(record['label'], labels)}"
            )
        examples.append(record)
    counts = Counter(r["label"] for r in examples)
    short = next((label for label in labels if counts[label] < k), None)
    if short is not None:
        raise GraftError(
            f"{path}: class {short!r} has {counts[short]} examples, fewer than --k {k} "
            "(lower --k or add examples of it)"
        )
    return examples


def read_verbalizers(values: list[str] | None, labels: list[str]) -> list[str]:
    """Each label's answer from --verbalizers values, each LABEL=WORDS or a file of such lines (the
    label itself when none are given)."""
    from graft.cli.app import read_lines
    from graft.fewshot.verbalizer import label_texts

    pairs = []
    for value in values or []:
        if "=" in value:
            pairs.append(value)
            continue
        path = Path(value)
        if not path.exists():
            raise GraftError(f"--verbalizers {value!r}: neither LABEL=WORDS nor an existing file")
        for n, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            if "=" not in line:
                raise GraftError(f"{path}, line {n}: expected LABEL=WORDS, e.g. {labels[0]}=...")
            pairs.append(line)
    return label_texts(labels, pairs, "--verbalizers", "verbalizer")


def sentence_encoder(name: str, reference: bool) -> Callable[[list[str]], Any]:
    """texts -> (N, P) unit-length embeddings by a sentence encoder (graft rag's, as graft embed --normalize)."""
    import torch

    from graft.rag import Embedder

    embedder = Embedder(name, kernels=not reference)
    return lambda texts: torch.from_numpy(embedder.embed(texts))


@app.command()
def icl(
    model: Annotated[str, typer.Argument(help="A chat model (a causal LM with a chat template): folder or Hub id.")],
    examples: Annotated[Path, typer.Option(help="The labelled examples to show: CSV, JSON lines... (text and label columns).")],
    labels: Annotated[str, typer.Option(help="The classes, comma-separated: sport,tech.")] = "",
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="A text to classify (repeatable).")] = None,
    data: Annotated[Path | None, typer.Option(help="Texts to classify: CSV, JSON lines... (a text column).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="--data's format (default: from the name).")] = None,
    column: Annotated[list[str] | None, typer.Option(help="YOUR_COLUMN=text or =label, for both files (repeatable).")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Examples of each class in the prompt.")] = 4,
    select: Annotated[str, typer.Option(help="random (one seeded set for every text) or similar (each text's nearest, by --encoder).")] = "random",
    encoder: Annotated[str | None, typer.Option(help="--select similar: the sentence encoder that finds the nearest examples.")] = None,
    verbalizers: Annotated[list[str] | None, typer.Option(help="LABEL=WORDS, the label's answer, or a file of such lines (repeatable; default: the label).")] = None,
    seed: Annotated[int | None, typer.Option(help="--select random: the seed that draws the examples (default 0).")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Tokens of each text (examples and inputs) kept in the prompt.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 4,
    reference: ReferenceOpt = False,
) -> None:  # fmt: skip
    """In-context few-shot classification: k --examples per class in a chat model's prompt, each
    label's answer scored by its likelihood (calibrated, for random examples): JSON lines like
    graft zeroshot."""
    from graft.fewshot.icl import SELECTIONS, icl_scores
    from graft.fewshot.verbalizer import check_chat_template
    from graft.io.hf import resolve
    from graft.loading import load_config, load_model
    from graft.tasks.zeroshot import check_prompts
    from graft.tokenizer import Tokenizer

    names = [label.strip() for label in labels.split(",")] if labels.strip() else []
    check_prompts(names, ["{}"], "icl")
    if select not in SELECTIONS:
        raise GraftError(
            f"--select {select!r}: one of {', '.join(SELECTIONS)}{did_you_mean(select, SELECTIONS)}"
        )
    if select == "similar" and encoder is None:
        raise GraftError("icl --select similar: needs a sentence encoder to find the nearest examples (--encoder MODEL)")  # fmt: skip
    if select == "similar" and seed is not None:
        raise GraftError(
            "icl --seed: --select similar draws nothing (each text's nearest examples are shown)"
        )
    if select == "random" and encoder is not None:
        raise GraftError(
            "icl --encoder: only --select similar uses a sentence encoder (add --select similar)"
        )
    words = read_verbalizers(verbalizers, names)
    records = read_texts(text, data, fmt, column, "icl")  # before the models load
    shown = read_examples(examples, column, names, k)
    folder = resolve(model)
    family, _ = load_config(folder)
    if not family.decoder:
        raise GraftError(f"icl: {model} is a {family.name} model; in-context learning needs a chat model (a causal LM)")  # fmt: skip
    tokenizer = Tokenizer.from_folder(folder)
    check_chat_template(tokenizer, "icl")
    encode = None if encoder is None else sentence_encoder(encoder, reference)
    chat = load_model(folder, task="causal-lm", kernels=not reference).eval()
    scores = icl_scores(
        chat, tokenizer, [r["text"] for r in records], [r["text"] for r in shown], [r["label"] for r in shown],
        names, words, k, select, seed or 0, encode, max_length, batch_size=batch_size,
    )  # fmt: skip
    write_predictions(records, scores, names, bool(text))


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
