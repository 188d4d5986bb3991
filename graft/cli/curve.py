"""``graft curve RECIPE``: the transfer curve, test accuracy against labelled examples per class.

    graft curve recipes/classification.yaml --labels 0,8,32,all --methods zeroshot,setfit,lora,full \\
        --seeds 3 --out curve/ [--chat-model SMOLLM2 --methods icl] [--set lora:optim.lr=1e-3]

Writes curve.csv (a row per run, rewritten after each, so --resume continues), curve.md (mean ±
standard deviation over the seeds) and curve.png (graft.fewshot.curve).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import app
from graft.errors import GraftError


def parse_sets(pairs: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """--set METHOD:KEY=VALUE -> {method: {key: value}} (values parsed as recipe overrides are)."""
    from graft.train.config import parse_override

    sets: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        method, sep, override = pair.partition(":")
        if not sep or method not in methods:
            raise GraftError(
                f"--set {pair!r}: expected METHOD:KEY=VALUE with METHOD one of --methods ({', '.join(methods)})"
            )
        key, value, _ = parse_override(override)
        sets.setdefault(method, {})[key] = value
    return sets


@app.command()
def curve(
    recipe: Annotated[Path, typer.Argument(help="A classification recipe (its model, data with a test split, optimizer).")],
    labels: Annotated[str, typer.Option(help="Labelled examples per class, comma-separated; 'all': the whole split.")] = "0,8,32,128,all",
    methods: Annotated[str, typer.Option(help="zeroshot, icl, setfit, features, lora, full (comma-separated).")] = "zeroshot,setfit,features,lora,full",
    seeds: Annotated[int, typer.Option(min=1, help="Draws of the labelled examples (and training seeds) per point.")] = 3,
    out: Annotated[Path, typer.Option(help="The folder for curve.csv, curve.md, curve.png and the runs.")] = Path("curve"),
    chat_model: Annotated[str | None, typer.Option(help="icl: the chat model shown the examples.")] = None,
    icl_limit: Annotated[int, typer.Option(min=1, help="icl: test rows scored (a seeded subset; 0 = all).")] = 200,
    icl_max: Annotated[int, typer.Option(min=1, help="icl: the most labels per class put in a prompt.")] = 8,
    icl_tokens: Annotated[int, typer.Option(min=8, help="icl: tokens of each text in the prompt.")] = 64,
    setfit_pairs: Annotated[int, typer.Option(min=2, help="setfit: the most contrastive pairs per run.")] = 4000,
    min_steps: Annotated[int, typer.Option(min=0, help="features/lora/full: at least this many optimizer steps.")] = 50,
    sets: Annotated[list[str] | None, typer.Option("--set", help="METHOD:KEY=VALUE, a recipe key for one method (repeatable).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Recipe keys to change, e.g. data.max_length=128.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the runs already in --out's curve.csv.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier curve in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:  # fmt: skip
    """The transfer curve: test accuracy against labelled examples per class for each method."""
    from graft.fewshot.curve import parse_labels, parse_methods, run_curve
    from graft.io.atomic import check_output
    from graft.train.config import load_recipe

    counts, chosen = parse_labels(labels), parse_methods(methods)
    per_method = parse_sets(sets, chosen)
    if resume and overwrite:
        raise GraftError("--resume keeps the runs in --out and --overwrite replaces them: pass one")
    if (out / "curve.csv").exists() and not (resume or overwrite):
        raise GraftError(
            f"{out}: holds a curve (curve.csv); pass --resume to continue it or --overwrite to replace it"
        )
    check_output(out, "--out", folder=True)
    config = load_recipe(recipe, overrides or [])
    rows = run_curve(
        config, counts, chosen, seeds, out, chat_model, icl_limit or None, icl_max, icl_tokens,
        setfit_pairs=setfit_pairs, min_steps=min_steps, overrides=per_method, resume=resume, quiet=True,
        log=(lambda line: None) if quiet else (lambda line: typer.echo(line, err=True)),
    )  # fmt: skip
    typer.echo((out / "curve.md").read_text(encoding="utf-8"), nl=False)
    typer.echo(f"{len(rows)} runs: {out / 'curve.csv'}, {out / 'curve.md'}, {out / 'curve.png'}", err=True)
