"""``graft info`` and ``graft embed``: a model's shape and its sentence embeddings."""

from __future__ import annotations

import io
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import BackendOpt, ModelArg, ReferenceOpt, app, read_lines
from graft.errors import GraftError


def count(n: int) -> str:
    return f"{n:,}"


@app.command()
def info(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    reference: ReferenceOpt = False,
) -> None:
    """Print a model's family, shape and exact parameter count."""
    from graft.loading import load_model

    m = load_model(model, task="base", kernels=not reference)
    cfg = stack = m.config
    if hasattr(m, "towers"):  # a dual encoder (CLIP): each tower's shape
        from graft.cli.vision import dual_encoder_facts

        facts = dual_encoder_facts(m)
    else:
        layers: dict[str, int] = {"layers": cfg.num_layers} if not hasattr(cfg, "decoder") else {}
        if not layers:  # an encoder-decoder: its decoder's shape, and both depths
            stack = cfg.decoder
            layers = {"encoder_layers": cfg.encoder.num_layers, "decoder_layers": stack.num_layers}
        facts = {
            "family": cfg.family,
            "model_type": cfg.hf_config.get("model_type", cfg.family),
            **layers,
            "hidden_size": stack.hidden_size,
            "heads": stack.num_heads,
            "kv_heads": stack.num_kv_heads,
            "intermediate_size": stack.intermediate_size,
            "vocab_size": stack.vocab_size,
            "max_positions": stack.max_positions,
            "parameters": sum(p.numel() for p in m.parameters()),
        }
    if as_json:
        typer.echo(json.dumps(facts))
        return
    for key, value in facts.items():
        shown = count(value) if key in ("vocab_size", "parameters") else value
        typer.echo(f"{key.replace('_', ' '):<18} {shown}")


class EmbedFormat(StrEnum):
    json = "json"
    npy = "npy"


@app.command()
def embed(
    model: ModelArg,
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="A text to embed (repeatable).")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A UTF-8 file, one text per line.")
    ] = None,
    normalize: Annotated[bool, typer.Option(help="L2-normalize each embedding.")] = False,
    fmt: Annotated[
        EmbedFormat, typer.Option("--format", help="json: one list per line; npy: a NumPy array.")
    ] = (EmbedFormat.json),
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Most texts per batch.")] = 256,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most padded tokens per batch.")] = 1024,
    max_length: Annotated[int | None, typer.Option(min=1, help="Truncate texts to this many tokens.")] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="An image or a folder of them, with a CLIP model (repeatable)."),
    ] = None,
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
) -> None:
    """Sentence embeddings: the mean of the last hidden states over real tokens (a CLIP model: its
    text or image embeddings, projected)."""
    if (text is None) + (file is None) + (image is None) != 2:
        raise GraftError(
            "embed: give one of --text (one or more), --file or --image, not several and not none"
        )
    from graft.io.atomic import check_output

    if out is not None:
        check_output(out, "--out", example=f"embeddings.{fmt.value}")
    texts = text if text is not None else read_lines(file) if file is not None else []

    from graft.cli.vision import clip_embeddings
    from graft.export.backend import is_exported, load_exported

    exported = backend is not None or is_exported(model)
    array = None if exported else clip_embeddings(model, texts, image, normalize, reference)  # None: not CLIP
    if array is not None:
        write_embeddings(array, fmt, out)
        return

    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tasks.embedding import embed as embed_texts
    from graft.tokenizer import Tokenizer

    if exported:  # a graft export folder, run by ONNX Runtime or torch
        if image is not None:
            raise GraftError(f"embed --image: {model} is an exported folder; give the CLIP model folder")
        runner = load_exported(model, backend)
        vectors = runner.embed(Tokenizer.from_folder(model), texts, batch_size, max_length, normalize)
    else:
        folder = resolve(model)
        m = load_model(folder, task="base", kernels=not reference)
        tokenizer = Tokenizer.from_folder(folder)
        vectors = embed_texts(
            m,
            tokenizer,
            texts,
            batch_size=batch_size,
            max_length=max_length,
            normalize=normalize,
            max_tokens=max_tokens,
        )
    write_embeddings(vectors.numpy(), fmt, out)


def write_embeddings(array: Any, fmt: EmbedFormat, out: Path | None) -> None:
    """(N, D) rows as JSON lines or one .npy array, to ``out`` (atomically) or stdout."""
    import numpy as np

    from graft.io.atomic import atomic_path

    if fmt is EmbedFormat.json:
        payload = "".join(json.dumps(row.tolist()) + "\n" for row in array).encode()
    else:
        buffer = io.BytesIO()
        np.save(buffer, array)
        payload = buffer.getvalue()
    if out is None:
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
    else:
        with atomic_path(out) as tmp:
            tmp.write_bytes(payload)
