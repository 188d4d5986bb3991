"""``graft train`` and ``graft tune``: a recipe, optional key=value overrides, a run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import app
from graft.errors import GraftError

RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe (see recipes/).")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Recipe keys to change, e.g. optim.lr=3e-5 train.epochs=2.")
]

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")]
OverwriteRunOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Start afresh in a run folder that holds an earlier run, replacing it."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a model as a recipe says; writes checkpoints, metrics, plots and the model to train.output."""
    from graft.train.build import run_recipe

    config = load_run(recipe, overrides, resume, overwrite)
    echo_result(run_recipe(config, resume=resume, quiet=quiet, overwrite=overwrite))


def load_run(recipe: Path, overrides: list[str] | None, resume: bool, overwrite: bool) -> Any:
    """The recipe with its overrides, for a command that trains into train.output."""
    from graft.train.config import load_recipe

    config = load_recipe(recipe, overrides or [])
    if resume and overwrite:
        raise GraftError("--resume continues the run in train.output and --overwrite replaces it: pass one")
    return config


def echo_result(result: dict[str, Any]) -> None:
    """A run's final figures as one JSON line, floats to 4 places."""
    typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


@app.command()
def tune(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Number of trials (default: tune.trials).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier search's trials in train.output.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the results table.")] = False,
) -> None:
    """Hyperparameter search with Optuna over the recipe's tune.space; prints and saves a results table."""
    from graft.train.config import load_recipe
    from graft.train.tune import run_search

    config = load_recipe(recipe, overrides or [])
    run_search(config, trials=trials, quiet=quiet, overwrite=overwrite)
