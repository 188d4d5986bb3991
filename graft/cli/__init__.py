"""The ``graft`` command line, a package on top of the library (no library module imports it).

Every user error ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import logging

import typer

# each module registers its commands on ``app`` when imported
from graft.cli import generate, models, strategies, tasks, train  # noqa: F401
from graft.cli.app import app
from graft.errors import GraftError


def main() -> None:
    # graft's own notes (trainable parameters, skipped tensors...) go to stderr, one line each
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("graft")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    try:
        app()
    except GraftError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
