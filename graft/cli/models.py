"""``graft info`` and ``graft embed``: a model's shape and its sentence embeddings."""

from __future__ import annotations

import io
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import BackendOpt, ModelArg, ReferenceOpt, app
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
    cfg = m.config
    facts = {
        "family": cfg.family,
        "model_type": cfg.hf_config.get("model_type", cfg.family),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_positions": cfg.max_positions,
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


def read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GraftError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise GraftError(f"{path}: is a folder, not a text file") from None
    except OSError as e:  # no permission, a disk error...
        raise GraftError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            texts.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise GraftError(f"{path}: line {number}: not UTF-8 text (byte {e.start + 1})") from None
    if not texts:
        raise GraftError(f"{path}: file is empty")
    return texts


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
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
) -> None:
    """Sentence embeddings: the mean of the last hidden states over real tokens."""
    if (text is None) == (file is None):
        raise GraftError("embed: give either --text (one or more) or --file, not both and not neither")
    from graft.io.atomic import atomic_path, check_output

    if out is not None:
        check_output(out, "--out", example=f"embeddings.{fmt.value}")
    texts = text if text is not None else read_lines(file)

    import numpy as np

    from graft.export.backend import is_exported, load_exported
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tasks.embedding import embed as embed_texts
    from graft.tokenizer import Tokenizer

    if backend is not None or is_exported(model):  # a graft export folder, run by ONNX Runtime or torch
        exported = load_exported(model, backend)
        vectors = exported.embed(Tokenizer.from_folder(model), texts, batch_size, max_length, normalize)
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
    array = vectors.numpy()
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
