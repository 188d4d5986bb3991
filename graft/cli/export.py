"""``graft export``: a model as ONNX, parity-checked, in a folder of its own.

graft export MODEL OUT/ [--format onnx|torchscript|exported-program] [--opset 18] [--optimize] [--int8] [--task embedding --pooling mean]
graft export MODEL OUT/ --format torchscript --dtype bfloat16   # bfloat16 weights, float32 inputs/outputs
graft export BASE OUT/ --adapter ADAPTER/      # a PEFT adapter merged into its base first
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import app
from graft.cli.generate import model_folder
from graft.errors import GraftError


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
        bool, typer.Option("--int8", help="Dynamic int8 quantization, checked by cosine to float32.")
    ] = False,
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
    check_output(out, "OUT", folder=True, overwrite=overwrite)
    with model_folder(model) as folder:  # a GGUF file's converted folder lasts until the export is written
        m, tokenizer = load_for_export(folder, adapter, task, pooling, normalize)
        if fmt == "web":  # the int8 ONNX export, then the page and onnxruntime-web around it
            from graft.export.web import check_web, export_web

            check_request(m, "onnx", opset, False, True)
            check_web(m, tokenizer)
            manifest = export_web(m, out, tokenizer, opset=opset)
        else:
            check_request(m, fmt, opset, optimize, int8, dtype)
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
            )
    summary = {k: manifest[k] for k in ("format", "family", "task", "file")}
    typer.echo(json.dumps({**summary, "out": str(out), "max_abs_diff": manifest["parity"]["max_abs_diff"]}))
