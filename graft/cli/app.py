"""The ``graft`` typer app and the argument types its command modules share."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="graft",
    help="Transfer learning with transformers: load, adapt, train, measure, ship.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="A Hugging Face-format folder or a Hub id.")]
