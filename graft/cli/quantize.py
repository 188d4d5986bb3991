"""``graft quantize``: a float checkpoint -> an int8 or bf16 one (graft.compress.quantize)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import ModelArg, app


@app.command()
def quantize(
    model: ModelArg,
    out: Annotated[
        Path, typer.Argument(help="The folder to write (config.json, model.safetensors, tokenizer).")
    ],
    method: Annotated[
        str,
        typer.Option(
            help="int8-dynamic (int8 weights and per-token int8 activations), int8-weight (int8 weights, "
            "float activations) or bf16."
        ),
    ] = "int8-dynamic",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT when it is not empty.")] = False,
) -> None:
    """Quantize a model's linear layers (embeddings, norms and heads stay float); graft loads OUT back."""
    from graft.compress.quantize import quantize_folder, size_on_disk
    from graft.io.hf import resolve

    folder = quantize_folder(model, out, method, overwrite=overwrite)
    before, after = size_on_disk(resolve(model)), size_on_disk(folder)
    typer.echo(f"wrote {folder} ({method}: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB)")
