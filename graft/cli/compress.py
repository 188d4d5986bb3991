"""``graft compress``: quantize, distil and prune one model as a plan says, and compare the variants
(graft.compress.compare) in OUT/report.md, report.csv and pareto.png."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import ModelArg, app
from graft.cli.tasks import ColumnOpt, FormatOpt, MaxLengthOpt, read_records
from graft.errors import GraftError

PLAN_HELP = (
    "Comma-separated steps: fp32, bf16, int8-dynamic, int8-weight, distill:layers=N, "
    "prune:heads=FRACTION,ffn=FRACTION (training steps also take steps=N and lr=X)."
)


@app.command()
def compress(
    model: ModelArg,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled test records every variant is scored on.")
    ],
    plan: Annotated[str, typer.Option(help=PLAN_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for models/, report.md, report.csv and pareto.png.")],
    train: Annotated[
        Path | None, typer.Option(help="Labelled training records for distill and prune's recovery.")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Add graft export's ONNX fp32 and int8 graphs as rows.")
    ] = False,
    steps: Annotated[int, typer.Option(min=0, help="Training steps of distill and prune's recovery.")] = 200,
    lr: Annotated[float, typer.Option(min=0.0, help="Their learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(min=1, help="Their batch size.")] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="Soft targets' temperature.")] = 2.0,
    texts: Annotated[int, typer.Option(min=1, help="Examples timed at batch 32.")] = 256,
    latency: Annotated[int, typer.Option(min=1, help="Single examples timed at batch 1 (p50).")] = 50,
    rounds: Annotated[int, typer.Option(min=1, help="Timing rounds; the variants take turns in each.")] = 3,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the training order and initialization.")] = 0,
    fmt: FormatOpt = None,
    column: ColumnOpt = None,
    max_length: MaxLengthOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what OUT holds.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Build every variant of --plan, score each on --data, time each in turns, and write the trade-offs."""
    from graft.compress.compare import Settings
    from graft.compress.compare import compress as run
    from graft.compress.plan import parse_plan
    from graft.io.atomic import check_output
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tasks import TaskModel

    for flag, value in (("--lr", lr), ("--temperature", temperature)):
        if not value > 0:
            raise GraftError(f"{flag} {value}: must be above 0")
    steps_ = parse_plan(plan)
    check_output(out, "--out", folder=True, overwrite=overwrite)
    folder = resolve(str(model))
    m = load_model(folder, kernels=False)  # its head reads the records
    if not isinstance(m, TaskModel):
        raise GraftError(
            f"{folder}: a bare {m.config.family} model; graft compress needs a fine-tuned task model"
        )
    test = list(read_records(data, fmt, column, m.head, labelled=True))
    if not test:
        raise GraftError(f"{data}: no records")
    records = list(read_records(train, fmt, column, m.head, labelled=True)) if train else None
    if train and not records:
        raise GraftError(f"{train}: no records")
    settings = Settings(
        steps=steps, lr=lr, batch_size=batch_size, temperature=temperature, max_length=max_length,
        texts=texts, latency=latency, rounds=rounds, seed=seed,
    )  # fmt: skip
    variants = run(
        folder, steps_, out, test, records, onnx, settings, log=(lambda line: None) if quiet else echo_err
    )
    for v in variants:
        typer.echo(
            f"{v.name:28s} {v.score:.4f}  {v.p50_ms:8.2f} ms  {v.per_s:9.1f}/s  "
            f"{v.bytes / 2**20:8.2f} MiB{'  *' if v.pareto else ''}"
        )
    typer.echo(f"wrote {out / 'report.md'}, report.csv and pareto.png")


def echo_err(line: str) -> None:
    typer.echo(line, err=True)
