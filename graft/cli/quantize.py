"""``graft quantize``: a float checkpoint -> an int8, int4 or bf16 one (graft.compress.quantize)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import app

ModelArg = Annotated[str, typer.Argument(help="A Hugging Face-format folder, a Hub id, or a .gguf file.")]


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
            "float activations), bf16, or int4-weight (decoders: 4-bit weights in groups of 32, bf16 "
            "activations; a .gguf file's Q4_0/Q4_1 blocks are kept as they are)."
        ),
    ] = "int8-dynamic",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT when it is not empty.")] = False,
) -> None:
    """Quantize a model's linear layers (embeddings, norms and heads stay float); graft loads OUT back."""
    from graft.compress.quantize import quantize_folder, size_on_disk
    from graft.io.hf import resolve

    folder = quantize_folder(model, out, method, overwrite=overwrite)
    before = Path(model).stat().st_size if model.endswith(".gguf") else size_on_disk(resolve(model))
    after = size_on_disk(folder)
    typer.echo(f"wrote {folder} ({method}: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB)")
