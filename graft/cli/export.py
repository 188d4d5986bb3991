"""``graft export``: a model as ONNX, parity-checked, in a folder of its own.

graft export MODEL OUT/ [--format onnx|torchscript|exported-program] [--opset 18] [--optimize] [--int8] [--task embedding --pooling mean]
graft export MODEL OUT/ --format torchscript --dtype bfloat16   # bfloat16 weights, float32 inputs/outputs
graft export BASE OUT/ --adapter ADAPTER/      # a PEFT adapter merged into its base first
graft export MODEL OUT/ --int8 --check-data dev.jsonl [--column body=text] [--min-agreement 0.97]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from graft.cli.app import app
from graft.cli.generate import model_folder
from graft.cli.tasks import ColumnOpt
from graft.errors import GraftError

if TYPE_CHECKING:
    from graft.export.check import Int8Check


def load_for_export(
    folder: Path, adapter: Path | None, task: str | None, pooling: str | None, normalize: bool | None
):
    """(model on the reference code, tokenizer or None) from a model folder (+ adapter)."""
    from graft.loading import load_adapter_model, load_config, load_model
    from graft.tokenizer import Tokenizer

    options = {k: v for k, v in {"pooling": pooling, "normalize": normalize}.items() if v is not None}
    if adapter is not None:
        if task is not None:
            raise GraftError("--task: an adapter folder brings its own task; drop --task")
        m = load_adapter_model(folder, adapter)
    else:
        if task == "causal-lm" and not getattr(load_config(folder)[1], "causal", False):  # before the weights
            raise GraftError(f"export: a {load_config(folder)[1].family} model has no causal LM to export")
        m = load_model(folder, task=task, kernels=False, **options)
    tokenizer = None
    if any((folder / name).exists() for name in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        tokenizer = Tokenizer.from_folder(folder)
    return m, tokenizer


def int8_options(
    int8: bool,
    check_data: Path | None,
    column: list[str] | None,
    min_agreement: float | None,
    min_cosine: float | None,
) -> Int8Check | None:
    """The int8 check the flags ask for (None: no --int8); their misuse refused before any work."""
    from graft.export.check import INT8_MIN_AGREEMENT, INT8_MIN_COSINE, Int8Check

    given = [
        flag
        for flag, value in (
            ("--check-data", check_data),
            ("--column", column),
            ("--min-agreement", min_agreement),
            ("--min-cosine", min_cosine),
        )
        if value is not None
    ]
    if not int8:
        if given:
            raise GraftError(f"{given[0]} judges the --int8 graph: add --int8")
        return None
    if column is not None and check_data is None:
        raise GraftError("--column names --check-data's columns: add --check-data FILE")
    if min_agreement is not None and check_data is None:
        raise GraftError(
            "--min-agreement is argmax agreement on --check-data's rows: add --check-data FILE "
            "(without it, --min-cosine bounds every random-token row's cosine)"
        )
    if check_data is not None and not check_data.exists():  # before the model loads
        from graft.data.readers import missing_path_error

        raise GraftError(f"--check-data {missing_path_error(check_data)}")
    return Int8Check(
        min_agreement=INT8_MIN_AGREEMENT if min_agreement is None else min_agreement,
        min_cosine=INT8_MIN_COSINE if min_cosine is None else min_cosine,
        data=None if check_data is None else f"--check-data {check_data}",
    )


def check_rows(
    m: Any,
    tokenizer: Any,
    check: Int8Check | None,
    check_data: Path | None,
    column: list[str] | None,
    min_agreement: float | None,
) -> None:
    """--check-data's records, read as graft predict reads them and collated by the model's head,
    into ``check`` before the export's work: a file the head cannot read is one line naming it."""
    from graft.cli.tasks import read_records
    from graft.export.check import LABEL_TASKS, record_cases
    from graft.export.graph import task_of

    if min_agreement is not None and task_of(m) not in LABEL_TASKS:
        raise GraftError(
            f"--min-agreement: int8 {task_of(m)} models are judged by cosine (--min-cosine), not argmax agreement"
        )
    if check is None or check_data is None:
        return
    if tokenizer is None:
        raise GraftError("--check-data: the model folder has no tokenizer to read its texts with")
    records = read_records(check_data, None, column, m.head)
    check.cases = record_cases(m, tokenizer, records, check.data)


@app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="A Hugging Face-format folder, a Hub id, or a .gguf file.")],
    out: Annotated[
        Path, typer.Argument(help="The folder to write (model file, tokenizer, labels, manifest).")
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="onnx, torchscript, exported-program, or web (a static in-browser page)."
        ),
    ] = "onnx",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (18 or newer; default 18).")] = None,
    task: Annotated[
        str | None, typer.Option(help="Export as this task (default: config.json's), e.g. embedding.")
    ] = None,
    pooling: Annotated[str | None, typer.Option(help="--task embedding: cls, mean, last or pooler.")] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="--task embedding: unit-length vectors.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="A PEFT adapter folder on MODEL: LoRA is merged before export.")
    ] = None,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="ONNX Runtime's transformer fusions, checked again.")
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Dynamic int8 quantization, checked against float32: a label head by argmax agreement "
            "on --check-data, anything else by every row's cosine.",
        ),
    ] = False,
    check_data: Annotated[
        Path | None,
        typer.Option(
            help="--int8: real records (CSV, JSON lines, CoNLL, SQuAD..., read as graft predict reads "
            "them) to check the int8 graph on."
        ),
    ] = None,
    column: ColumnOpt = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="--check-data: the share of rows whose int8 argmax must be float32's (0.97).",
        ),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="--int8 judged by cosine (not a label head with --check-data): every row's cosine to "
            "float32 must reach this (0.99).",
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="float32, or bfloat16 (weights and computation; torchscript and exported-program)."
        ),
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT when it is not empty.")] = False,
) -> None:
    """Export a model (ONNX, TorchScript or torch.export), checked against graft on shapes it was not traced with."""
    import json

    from graft.export import FORMATS, OUTPUTS, check_dtype, check_request, export_model
    from graft.export.onnx import check_opset
    from graft.io.atomic import check_output

    if fmt not in (*FORMATS, "web"):
        raise GraftError(f"--format {fmt}: not one of {', '.join((*FORMATS, 'web'))}")
    if fmt == "web" and optimize:
        raise GraftError("--optimize: not with --format web (the page runs the int8 graph as exported)")
    if fmt not in ("onnx", "web") and (opset is not None or optimize or int8):
        flag = "--opset" if opset is not None else "--optimize" if optimize else "--int8"
        raise GraftError(f"{flag} is for --format onnx, not {fmt}")
    if opset is not None:
        check_opset(opset)
    check_dtype("onnx" if fmt == "web" else fmt, dtype, int8)
    if task is not None and task != "base" and task not in OUTPUTS:  # before loading anything
        raise GraftError(f"export: the {task} task cannot be exported (known: {', '.join(OUTPUTS)})")
    if (pooling is not None or normalize is not None) and task != "embedding":
        raise GraftError("--pooling and --normalize shape an embedding model: add --task embedding")
    check = int8_options(fmt == "web" or int8, check_data, column, min_agreement, min_cosine)
    check_output(out, "OUT", folder=True, overwrite=overwrite)
    with model_folder(model) as folder:  # a GGUF file's converted folder lasts until the export is written
        m, tokenizer = load_for_export(folder, adapter, task, pooling, normalize)
        if fmt == "web":  # the int8 ONNX export, then the page and onnxruntime-web around it
            from graft.export.web import check_web, export_web

            check_request(m, "onnx", opset, False, True, int8_check=check)
            check_web(m, tokenizer)
            check_rows(m, tokenizer, check, check_data, column, min_agreement)
            manifest = export_web(m, out, tokenizer, opset=opset, int8_check=check)
        else:
            check_request(m, fmt, opset, optimize, int8, dtype, check)
            check_rows(m, tokenizer, check, check_data, column, min_agreement)
            manifest = export_model(
                m,
                out,
                tokenizer,
                fmt=fmt,
                opset=opset,
                optimize=optimize,
                int8=int8,
                dtype=dtype,
                source=folder,
                int8_check=check,
            )
    if manifest["int8"] is not None:  # what the int8 graph was checked on, and how
        typer.echo(f"int8: {manifest['int8']['checked']}", err=True)
    summary = {k: manifest[k] for k in ("format", "family", "task", "file")}
    typer.echo(json.dumps({**summary, "out": str(out), "max_abs_diff": manifest["parity"]["max_abs_diff"]}))
