"""``graft distill`` (a recipe with a ``distill:`` section), ``graft prune`` and ``graft heads``
(chapter 8's compression and chapter 6's head importance)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import ModelArg, app
from graft.cli.tasks import (
    BatchOpt,
    ColumnOpt,
    DeviceOpt,
    FormatOpt,
    MaxLengthOpt,
    load_task_model,
    read_records,
)
from graft.cli.train import (
    OverridesArg,
    OverwriteRunOpt,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    echo_result,
    load_run,
)
from graft.errors import GraftError

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Labelled records: CSV, JSON lines, CoNLL...")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace what the output folder holds.")]


@app.command()
def distill(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Distil the recipe's teacher (distill.teacher) into a smaller student; the student is train.output/model."""
    from graft.compress.distill import run_distill

    config = load_run(recipe, overrides, resume, overwrite)
    echo_result(run_distill(config, resume=resume, quiet=quiet, overwrite=overwrite))


def labelled_batches(
    m: Any,
    tokenizer: Any,
    data: Path,
    fmt: str | None,
    column: list[str] | None,
    size: int,
    max_length: int | None,
) -> list[dict[str, Any]]:
    """The task model's batches of a labelled file (collated as training collates them)."""
    from graft.tasks.predict import batches

    records = list(read_records(data, fmt, column, m.head, labelled=True))
    if not records:
        raise GraftError(f"{data}: no records")
    length = max_length or 512
    return [m.head.collate(chunk, tokenizer, length) for chunk in batches(records, size)]


def recover(
    model: Any, batches: list[dict[str, Any]], steps: int, lr: float, teacher: Any = None
) -> list[float]:
    """A short fine-tune of a pruned model on ``batches`` (cycled): on the labels, or distilled from
    ``teacher`` (the unpruned model) when given. Returns the loss of each step."""
    from graft.compress.distill import Distiller, train_steps

    return train_steps(Distiller(model, teacher) if teacher is not None else model, batches, steps, lr)


@app.command()
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="Folder for the pruned model (and prune_report.json).")],
    data: DataOpt,
    heads: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Fraction of all attention heads to remove.")
    ] = 0.0,
    ffn: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Fraction of all feed-forward neurons to remove.")
    ] = 0.0,
    sparsity: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="Then zero this fraction of each block weight matrix.")
    ] = 0.0,
    scope: Annotated[
        str,
        typer.Option(
            help="Rank heads and neurons across all layers (global) or take the same share of each layer (layer)."
        ),
    ] = "global",
    method: Annotated[str, typer.Option(help="Unstructured sparsity: magnitude or movement.")] = "magnitude",
    recover_steps: Annotated[int, typer.Option(min=0, help="Fine-tune this many steps after pruning.")] = 0,
    recover_lr: Annotated[
        float, typer.Option(min=0.0, help="Learning rate of the recovery fine-tune.")
    ] = 2e-5,
    distill: Annotated[
        bool,
        typer.Option("--distill", help="Recover by distillation from the unpruned model, not labels alone."),
    ] = False,
    fmt: FormatOpt = None,
    column: ColumnOpt = None,
    batch_size: BatchOpt = 16,
    max_length: MaxLengthOpt = None,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Remove the least important heads and feed-forward neurons (scored on --data); optionally sparsify and recover."""
    from graft.compress.prune import SPARSITY_METHODS, check_scope, movement_scores, sparsify, sparsity_report
    from graft.compress.prune import prune as run
    from graft.interpret.heads import quality
    from graft.io.atomic import atomic_folder, check_output, write_json
    from graft.loading import save_model

    if method not in SPARSITY_METHODS:
        raise GraftError(f"--method {method}: not one of {', '.join(SPARSITY_METHODS)}")
    check_scope(scope, "--scope ")
    if not (heads or ffn or sparsity):
        raise GraftError(
            "prune: nothing to remove; give --heads, --ffn or --sparsity (fractions, e.g. --heads 0.33)"
        )
    check_output(out, "OUT", folder=True, overwrite=overwrite)
    m, tokenizer = load_task_model(str(model), device)
    batches = labelled_batches(m, tokenizer, data, fmt, column, batch_size, max_length)
    teacher = copy.deepcopy(m) if distill and recover_steps else None
    before = quality(m, batches)
    m, report = run(m, batches, heads, ffn, scope=scope)
    if sparsity:
        # movement scores come from a short fine-tune of a copy: the model itself is not changed
        scores = movement_scores(copy.deepcopy(m), batches) if method == "movement" else None
        sparsify(m, sparsity, method, scores)
    report["before"], report["pruned"] = before, quality(m, batches)
    if recover_steps:
        masks = None
        if sparsity:  # recovery keeps the zeros: the weights removed stay removed
            from graft.compress.prune import prunable_weights

            masks = {k: (w != 0) for k, w in prunable_weights(m).items()}
        report["recovery_losses"] = recover(m, batches, recover_steps, recover_lr, teacher)
        if masks is not None:
            import torch

            with torch.no_grad():
                for k, w in prunable_weights(m).items():
                    w.mul_(masks[k])
        report["recovered"] = quality(m, batches)
    if sparsity:
        report["sparsity"] = sparsity_report(m)
    del report["importance"]
    with atomic_folder(out) as folder:
        save_model(m, folder, tokenizer)
        write_json(folder / "prune_report.json", report)
    shown = {k: v for k, v in report.items() if k not in ("recovery_losses", "sparsity")}
    typer.echo(json.dumps(shown))


@app.command("heads")
def head_importance(
    model: ModelArg,
    data: DataOpt,
    out: Annotated[
        Path, typer.Option(help="Folder for importance.json, heads.png, curve.png and curve.csv.")
    ],
    fmt: FormatOpt = None,
    column: ColumnOpt = None,
    batch_size: BatchOpt = 16,
    max_length: MaxLengthOpt = None,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random masking order.")] = 0,
) -> None:
    """Head importance (Michel et al. 2019) on --data: a layer x head heat map and the masking curve."""
    from graft.interpret.heads import curve_png, heatmap_png, importance, masking_curve
    from graft.io.atomic import check_output, write_json, write_text

    check_output(out, "--out", folder=True)
    m, tokenizer = load_task_model(str(model), device)
    batches = labelled_batches(m, tokenizer, data, fmt, column, batch_size, max_length)
    scores = importance(m, batches)
    rows = masking_curve(m, batches, scores, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "importance.json", scores.to_dict())
    heatmap_png(scores, out / "heads.png", title=f"head importance: {Path(str(model)).name} on {data.name}")
    metric = "accuracy" if "importance/accuracy" in rows[0] else "loss"
    curve_png(rows, out / "curve.png", metric)
    keys = list(rows[0])
    write_text(
        out / "curve.csv",
        "\n".join([",".join(keys)] + [",".join(f"{r[k]:.6g}" for k in keys) for r in rows]) + "\n",
    )
    typer.echo(
        json.dumps({"layers": len(scores.heads), "heads": sum(len(h) for h in scores.heads), "curve": rows})
    )
