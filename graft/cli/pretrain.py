"""``graft pretrain``: masked LM, causal LM, T5 span corruption or ELECTRA (continued) pretraining on text
files, streamed."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from graft.cli.app import app
from graft.cli.train import OverridesArg, RecipeArg, ResumeOpt


@app.command()
def pretrain(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the model folder train.output holds.")
    ] = False,
    resume: ResumeOpt = False,
) -> None:
    """Pretrain a model on raw text (pretrain.objective: mlm, clm, span-corruption or electra); saves a HF folder
    to train.output.

    checkpoint.every=N writes a checkpoint every N steps; --resume continues from the newest, exactly.
    """
    from graft.pretrain import run_pretrain
    from graft.train.config import load_recipe

    config = load_recipe(recipe, overrides or [])
    summary = run_pretrain(config, source=str(recipe), overwrite=overwrite, resume=resume)
    typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
