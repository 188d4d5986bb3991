"""The ``graft`` typer app, its global options and the argument types its command modules share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from graft.errors import GraftError

app = typer.Typer(
    name="graft",
    help="Transfer learning with transformers: load, adapt, train, measure, ship.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="A Hugging Face-format folder or a Hub id.")]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        help="onnx or torchscript: run a graft export folder with it (default: the folder's format)."
    ),
]
ReferenceOpt = Annotated[
    bool,
    typer.Option("--reference", help="Run graft.nn's plain reference code, without graft's CPU kernels."),
]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("graft-ml")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"graft {version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for torch (default: one per core). On a busy machine, --threads 1 "
            "can be many times faster.",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=show_version, help="Print graft's version and exit."
        ),
    ] = False,
) -> None:
    """Transfer learning with transformers: load, adapt, train, measure, ship."""
    if ctx.invoked_subcommand is None:  # `graft` alone: the help, and success
        typer.echo(ctx.get_help())
        raise typer.Exit()
    if threads is not None:
        import torch

        # before any work: torch's pool and the processes a command starts (compare, data workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def os_error_line(e: OSError) -> str:
    """'FILE: Permission denied': an OSError as one line that names the file."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return reason
    if e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    return f"{e.filename}: {reason}"


def read_lines(path: Path) -> list[str]:
    """A UTF-8 file's lines (graft embed --file, graft index --texts), each error one line naming the file."""
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
