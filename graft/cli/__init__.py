"""The ``graft`` command line, a package on top of the library (no library module imports it).

Every user error ends in one line on stderr, starting "error: ", and a non-zero exit.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import typer

# each module registers its commands on ``app`` when imported
from graft.cli import (  # noqa: F401  (each module registers its commands)
    compress,
    curve,
    distill,
    explain,
    export,
    fewshot,
    generate,
    models,
    pretrain,
    quantize,
    rag,
    serve,
    speech,
    strategies,
    tasks,
    tokenizer,
    train,
    vision,
)
from graft.cli.app import app, os_error_line
from graft.errors import GraftError


def fail(message: str, code: int = 1) -> SystemExit:
    """Print ``message`` as one line on stderr; the SystemExit to raise."""
    typer.echo("error: " + " ".join(message.split("\n")), err=True)
    return SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: sys.argv[1:]); always ends in SystemExit."""
    # graft's own notes (trainable parameters, skipped tensors...) go to stderr, one line each;
    # the handler is this call's, so that calls in one process (tests) do not stack handlers
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("graft")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # not standalone: click's usage errors come here as exceptions, to print as one line
        code = app(args=list(argv) if argv is not None else None, prog_name="graft", standalone_mode=False)
    except typer.TyperException as e:  # a usage error: unknown option, bad or missing value...
        ctx = getattr(e, "ctx", None)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if ctx is not None:
            message = f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"
        raise fail(message, getattr(e, "exit_code", 2)) from None
    except GraftError as e:
        raise fail(str(e)) from None
    except OSError as e:  # the last resort for a file a reader did not expect to fail
        raise fail(os_error_line(e)) from None
    except (KeyboardInterrupt, typer.Abort):
        raise SystemExit(130) from None
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    raise SystemExit(code if isinstance(code, int) else 0)
