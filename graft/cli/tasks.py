"""``graft predict`` and ``graft eval``: any saved task model, its task read from config.json.

    graft predict MODEL --input texts.jsonl [--output predictions.jsonl]
    graft eval MODEL --data test.csv [--out results/] [--groups COLUMN]

Predictions are JSON lines (label and score, entity spans, answers, generated text...); eval
prints the task's metrics as JSON and, with --out, writes metrics.json, predictions.jsonl and,
for single-label classification, confusion_matrix.png; with --groups COLUMN, every metric per
group (the column's values) and the largest gap between groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import BackendOpt, ModelArg, ReferenceOpt, app
from graft.errors import GraftError

FormatOpt = Annotated[
    str | None, typer.Option("--format", help="csv, tsv, jsonl, conll, squad... (default: from the name).")
]
ColumnOpt = Annotated[
    list[str] | None, typer.Option("--column", help="YOUR_COLUMN=KEY, e.g. review=text (repeatable).")
]
BatchOpt = Annotated[int, typer.Option(min=1, help="Records per batch.")]
MaxLengthOpt = Annotated[
    int | None, typer.Option(min=8, help="Tokens per row (default: the model's window).")
]
MaxNewOpt = Annotated[int, typer.Option(min=1, help="Causal LM and seq2seq: tokens to generate at most.")]
BeamsOpt = Annotated[int, typer.Option(min=1, help="Seq2seq: beam search with this many beams.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda when available).")]
SkipBadRowsOpt = Annotated[
    bool, typer.Option("--skip-bad-rows", help="Skip rows that cannot be read; count them on stderr.")
]
EncodingOpt = Annotated[
    str,
    typer.Option(help="Text encoding: auto (UTF-8; cp1252 for a class folder's non-UTF-8 files), cp1252..."),
]


def parse_columns(pairs: list[str] | None) -> dict[str, str]:
    columns = {}
    for pair in pairs or []:
        source, sep, key = pair.partition("=")
        if not sep or not source or not key:
            raise GraftError(f"--column {pair!r}: expected YOUR_COLUMN=KEY, e.g. review=text")
        columns[source] = key
    return columns


def pick_device(device: str | None) -> str:
    """--device checked before the model loads: a name torch knows, on a device this machine has."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError, NotImplementedError) as e:  # unknown name, no such device
        reason = (str(e) or type(e).__name__).splitlines()[0].split(". ")[0]  # torch's first sentence
        raise GraftError(f"--device {device}: torch cannot use it here ({reason})") from None
    return device


def load_task_model(
    model: str, device: str | None, reference: bool = False, backend: str | None = None, setfit: bool = False
):
    """The task model and tokenizer of a model folder (or Hub id); ``reference``: without the kernels.
    A graft export folder (or ``backend``) gives its ExportedModel, run by ONNX Runtime or torch;
    with ``setfit`` (predict, eval), a SetFit folder (graft setfit) its SetFitTask, a classification
    model that only ``runner`` runs."""
    from graft.export.backend import is_exported, load_exported
    from graft.fewshot.setfit import SetFitTask, is_setfit
    from graft.io.hf import resolve
    from graft.loading import load_model, load_processor
    from graft.tasks import TaskModel

    if backend is not None or is_exported(model):
        return load_exported(model, backend), load_processor(model)
    chosen = pick_device(device)  # checked first, as for any model
    folder = resolve(model)
    if setfit and is_setfit(folder):  # the CPU unless --device says otherwise (refused there)
        return SetFitTask.load(folder, device), load_processor(folder)
    device = chosen
    m = load_model(folder, device=device, kernels=not reference)
    if not isinstance(m, TaskModel):
        raise GraftError(
            f"{folder}: a bare {m.config.family} model has no task head; predict/eval need a task model"
        )
    return m, load_processor(folder)  # a tokenizer, or an image model's ImageProcessor


def runner(m: Any):
    """The predict loop of a model load_task_model gave: a SetFitTask's own, else ``predictor``'s."""
    from graft.export.backend import predictor
    from graft.fewshot.setfit import SetFitTask

    return m.predict if isinstance(m, SetFitTask) else predictor(m)


def seq2seq_generation(model: str, m: Any, max_new_tokens: int, num_beams: int) -> Any:
    """How predict and eval generate with an encoder-decoder: its generation_config.json, then the options."""
    from graft.generation import GenerationConfig, folder_defaults
    from graft.io.hf import resolve

    defaults = folder_defaults(resolve(model))
    return GenerationConfig.for_model(m, defaults, max_new_tokens=max_new_tokens, num_beams=num_beams)


def read_records(
    path: Path,
    fmt: str | None,
    columns: list[str] | None,
    head: Any,
    labelled: bool = False,
    skip_bad_rows: bool = False,
    encoding: str = "auto",
):
    """The records of ``path`` for ``head``: predict reads no labels, eval checks them (graft.tasks.collate)."""
    from graft.data import load_records
    from graft.tasks.collate import record_options

    options = record_options(head, labelled)
    return load_records(path, fmt, parse_columns(columns), skip_bad_rows, encoding=encoding, **options)


def jsonl_line(record: dict[str, Any], prediction: dict[str, Any]) -> str:
    from graft.tasks.predict import prediction_row

    return json.dumps(prediction_row(record, prediction), ensure_ascii=False) + "\n"


def options(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


@app.command()
def predict(
    model: ModelArg,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Records to predict: CSV, JSON lines, CoNLL, SQuAD...")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSON lines here instead of stdout.")
    ] = None,
    fmt: FormatOpt = None,
    column: ColumnOpt = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLengthOpt = None,
    device: DeviceOpt = None,
    threshold: Annotated[
        float | None, typer.Option(help="Multi-label: sigmoid above which a label is on.")
    ] = None,
    n_best: Annotated[int | None, typer.Option(min=1, help="QA: answers kept per question.")] = None,
    max_answer_length: Annotated[
        int | None, typer.Option(min=1, help="QA: longest answer, in tokens.")
    ] = None,
    null_threshold: Annotated[
        float | None,
        typer.Option(help="QA with unanswerable questions: how much the no-answer score must win by."),
    ] = None,
    max_new_tokens: MaxNewOpt = 64,
    num_beams: BeamsOpt = 1,
    skip_bad_rows: SkipBadRowsOpt = False,
    encoding: EncodingOpt = "auto",
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
) -> None:
    """Predict with a task model: one JSON line per input record."""
    from graft.export.backend import ExportedModel
    from graft.generation.text import generate_records, seq2seq_records
    from graft.io.atomic import atomic_path, check_output

    if output is not None:
        check_output(output, "--output", example="predictions.jsonl")
    m, tokenizer = load_task_model(model, device, reference, backend, setfit=True)
    if m.task in ("causal-lm", "seq2seq") and isinstance(m, ExportedModel):
        what = "causal LM" if m.task == "causal-lm" else "seq2seq model"
        raise GraftError(f"{model}: an exported {what} generates with graft generate, not predict")
    run = runner(m)
    records = read_records(input, fmt, column, m.head, skip_bad_rows=skip_bad_rows, encoding=encoding)
    if m.task == "causal-lm":
        pairs = generate_records(m, tokenizer, records, min(batch_size, 8), max_length, max_new_tokens)
    elif m.task == "seq2seq":
        config = seq2seq_generation(model, m, max_new_tokens, num_beams)
        pairs = seq2seq_records(m, tokenizer, records, min(batch_size, 8), max_length, config)
    else:
        extra = options(
            threshold=threshold,
            n_best=n_best,
            max_answer_length=max_answer_length,
            null_threshold=null_threshold,
        )
        pairs = run(tokenizer, records, batch_size, max_length, **extra)
    if output is None:
        for record, prediction in pairs:
            sys.stdout.write(jsonl_line(record, prediction))
        sys.stdout.flush()
        return
    # predictions stream into a temporary file that becomes OUTPUT only once all are written
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record, prediction in pairs:
            f.write(jsonl_line(record, prediction))


@app.command("eval")
def evaluate(
    model: ModelArg,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled records: CSV, JSON lines, CoNLL, SQuAD...")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for metrics.json, predictions.jsonl (and confusion_matrix.png)."),
    ] = None,
    fmt: FormatOpt = None,
    column: ColumnOpt = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLengthOpt = None,
    device: DeviceOpt = None,
    max_new_tokens: MaxNewOpt = 64,
    num_beams: BeamsOpt = 1,
    skip_bad_rows: SkipBadRowsOpt = False,
    encoding: EncodingOpt = "auto",
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
    groups: Annotated[
        str | None,
        typer.Option(
            "--groups", help="A column of group names: every metric per group, and the largest gap."
        ),
    ] = None,
) -> None:
    """Evaluate a task model on labelled data: prints the task's metrics as JSON."""
    from graft.cli.speech import evaluate_speech, is_whisper
    from graft.export.backend import ExportedModel
    from graft.generation.text import seq2seq_records
    from graft.io.atomic import atomic_path, check_output, write_json

    if is_whisper(model):  # speech in: a data set of audio files and transcripts, WER and CER out
        return evaluate_speech(
            model,
            data,
            out,
            batch_size,
            reference,
            num_beams,
            fmt,
            parse_columns(column),
            skip_bad_rows,
            encoding,
            backend,
        )
    if out is not None:
        check_output(out, "--out", folder=True)
    m, tokenizer = load_task_model(model, device, reference, backend, setfit=True)
    columns = [*(column or []), *([f"{groups}=group"] if groups else [])]  # the group column, read as "group"
    records, predictions = [], []
    if m.task == "seq2seq" and isinstance(m, ExportedModel):
        raise GraftError(f"{model}: an exported seq2seq model generates with graft generate, not eval")
    labelled = read_records(data, fmt, columns, m.head, True, skip_bad_rows, encoding)
    if m.task == "seq2seq":  # generated texts (ROUGE, BLEU, chrF) and the targets' loss
        config = seq2seq_generation(model, m, max_new_tokens, num_beams)
        pairs = seq2seq_records(m, tokenizer, labelled, min(batch_size, 8), max_length, config)
    else:
        pairs = runner(m)(tokenizer, labelled, batch_size, max_length)
    for record, prediction in pairs:
        records.append(record)
        predictions.append(prediction)
    if not records:
        raise GraftError(f"{data}: no records")
    metrics = m.head.evaluate(predictions, records)
    metrics["examples"] = len(records)
    if groups:
        from graft.interpret.fairness import group_metrics

        metrics["groups"] = group_metrics(m.head, predictions, records, [r["group"] for r in records])
    typer.echo(json.dumps(metrics, ensure_ascii=False))
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(jsonl_line(r, p) for r, p in zip(records, predictions, strict=True))
    if "confusion_matrix" in metrics:
        from graft.metrics import confusion_matrix_png

        cm = metrics["confusion_matrix"]
        confusion_matrix_png(
            cm["matrix"],
            cm["labels"],
            out / "confusion_matrix.png",
            title=f"{Path(model).name} on {data.name}",
        )
