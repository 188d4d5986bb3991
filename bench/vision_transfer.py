"""Experiment 1: how much does pretraining buy when labels are few? (issue 18, item 4)

A small ViT (28 x 28 grayscale images in 7 x 7 patches: 16 patches and [CLS], 4 pre-LN blocks of
--dim) is pretrained on Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress, coat: all
30,000 of their training images) and saved as a Hugging Face ViT folder. Classes 5-9 (sandal,
shirt, sneaker, bag, ankle boot) are then learned from 10, 100 and 1,000 labelled training images
per class, four ways, each with a new 5-way head:

  scratch  the same architecture, randomly initialized, every weight trains
  probe    the pretrained body frozen, only the head trains (graft's `features` strategy)
  full     the pretrained body fine-tuned whole (`full`)
  lora     LoRA on the pretrained body's attention (`lora:r=8,alpha=16,targets=q+v`)

Every run is graft's own path: load_model(folder, task="image-classification"), apply_strategy,
graft.train.Trainer with the model's ImageProcessor. The labelled subset (stratified) and the
head's initialization change with the seed; each run trains for the same number of optimizer
steps, whatever its number of labels. Reported: accuracy on all 5,000 test images of classes 5-9,
mean and spread (min-max) over the seeds, as results.csv (every run), table.md and table.csv
(mean, std, min, max per method and size) and transfer.png (mean with a min-max band) in --out.
Ends with one JSON line.

    nice -n 10 python -m bench.vision_transfer [--out DIR] [--labels 10,100,1000] [--seeds 3]
        [--pretrain-epochs E] [--steps S] [--dim D] [--small]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import FASHION, FASHION_CLASSES, counts, emit, fail, require_fashion_mnist

CLASSES = FASHION_CLASSES
SOURCE, TARGET = CLASSES[:5], CLASSES[5:]
# method -> (strategy, learning rate, whether the body starts from the pretrained weights)
METHODS = {
    "scratch": ("full", 1e-3, False),
    "probe": ("features", 1e-2, True),
    "full": ("full", 3e-4, True),
    "lora": ("lora:r=8,alpha=16,targets=q+v", 2e-3, True),
}


def records(split: str, classes: list[str]) -> list[dict[str, Any]]:
    """Fashion-MNIST records (a uint8 (28, 28) image and a class name) of ``classes``, in file order."""
    from graft.data import read_idx

    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
    labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")  # (N,)
    keep = {CLASSES.index(c) for c in classes}
    return [{"image": images[i], "label": CLASSES[y]} for i, y in enumerate(labels.tolist()) if y in keep]


def labelled(pool: list[dict[str, Any]], per_class: int, seed: int) -> list[dict[str, Any]]:
    """``per_class`` records of each class of ``pool``, drawn with ``seed`` (a stratified sample)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name in sorted({r["label"] for r in pool}):
        rows = [r for r in pool if r["label"] == name]
        chosen += [rows[i] for i in rng.choice(len(rows), per_class, replace=False)]
    return chosen


def recipe(output: str, lr: float, batch_size: int, seed: int, epochs: float = 1.0, max_steps: int = 0):
    from graft.train.config import load_recipe

    return load_recipe(
        base={
            "optim": {"lr": lr, "weight_decay": 0.05},
            "schedule": {"name": "cosine", "warmup_ratio": 0.1},
            "train": {"output": output, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                      "seed": seed, "device": "cpu", "plots": False, "log_every": 50},
            "eval": {"batch_size": 256},
            "checkpoint": {"keep": 0, "save_model": False},
        }
    )  # fmt: skip


def fit(model, processor, train: list[dict], test: list[dict], rcp) -> dict[str, float]:
    """Train ``model`` with graft's Trainer, then its accuracy (and loss) on ``test``."""
    from graft.train.loop import Trainer

    head = model.head

    def collate(batch: list[dict]) -> dict[str, Any]:
        return head.collate(batch, processor)

    trainer = Trainer(model, rcp, train, collate, quiet=True)
    result = trainer.fit()
    metrics = trainer.evaluate(test)
    return {"accuracy": metrics["accuracy"], "train_seconds": result["train_seconds"]}


def vit_config(dim: int) -> dict[str, Any]:
    """The HF config.json of the small ViT (no pooler: the heads read [CLS] from the last layer)."""
    return {
        "model_type": "vit", "architectures": ["ViTModel"], "hidden_size": dim, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 2 * dim, "image_size": 28, "patch_size": 7,
        "num_channels": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6, "qkv_bias": True,
    }  # fmt: skip


def fresh_model(dim: int, classes: list[str]):
    """A randomly initialized ViT with an image-classification head over ``classes``."""
    from graft import kernels
    from graft.models import FAMILIES
    from graft.models.vit import config_from_hf
    from graft.nn import Transformer
    from graft.tasks import TaskModel
    from graft.tasks.image import ImageClassificationHead

    cfg = config_from_hf(vit_config(dim))
    cfg.pooler = False
    assert FAMILIES[cfg.family].name == "vit"
    body = Transformer(cfg)
    return kernels.optimize(TaskModel(body, ImageClassificationHead(body, id2label=classes)))


def pretrain(args, folder: Path) -> dict[str, Any]:
    """The ViT trained on every training image of classes 0-4, saved to ``folder`` (body only)."""
    from graft.loading import save_model
    from graft.strategies import apply_strategy
    from graft.vision import ImageProcessor

    torch.manual_seed(0)
    model = apply_strategy(fresh_model(args.dim, SOURCE), "full")
    processor = ImageProcessor(
        size=(28, 28), channels=1, mean=(0.5,), std=(0.5,), image_size=28, augment="none"
    )
    train = records("train", SOURCE)[: args.pretrain_limit or None]
    test = records("test", SOURCE)
    with tempfile.TemporaryDirectory() as out:
        rcp = recipe(out, 1e-3, 128, 0, epochs=args.pretrain_epochs)
        figures = fit(model, processor, train, test, rcp)
    print(
        f"pretrained on {len(train)} images of classes 0-4 in {figures['train_seconds']:.0f} s: "
        f"test accuracy {figures['accuracy']:.4f} on their {len(test)} test images"
    )
    save_model(model.body, folder)
    processor.save(folder)
    return {"pretrain_images": len(train), "pretrain_accuracy": round(figures["accuracy"], 4),
            "pretrain_seconds": round(figures["train_seconds"], 1)}  # fmt: skip


def transfer(args, folder: Path, method: str, per_class: int, seed: int, pool, test) -> dict[str, Any]:
    import dataclasses

    from graft.loading import load_model
    from graft.strategies import apply_strategy, count_parameters
    from graft.vision import ImageProcessor

    spec, lr, pretrained = METHODS[method]
    torch.manual_seed(seed)
    if pretrained:
        model = load_model(folder, task="image-classification", id2label=TARGET, to_train=True)
    else:
        model = fresh_model(args.dim, TARGET)
    model = apply_strategy(model, spec)
    processor = dataclasses.replace(ImageProcessor.for_model(folder, model.config), augment="none")
    train = labelled(pool, per_class, seed)
    batch = min(args.batch_size, len(train))
    with tempfile.TemporaryDirectory() as out:
        figures = fit(model, processor, train, test, recipe(out, lr, batch, seed, max_steps=args.steps))
    return {"method": method, "per_class": per_class, "seed": seed, "accuracy": round(figures["accuracy"], 4),
            "trainable": count_parameters(model).trainable, "seconds": round(figures["train_seconds"], 1)}  # fmt: skip


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, labels per class): mean, std, min and max accuracy over the seeds."""
    rows = []
    for method in METHODS:
        for per_class in sorted({r["per_class"] for r in runs}):
            acc = [r["accuracy"] for r in runs if r["method"] == method and r["per_class"] == per_class]
            if acc:
                std = statistics.stdev(acc) if len(acc) > 1 else 0.0
                rows.append({"method": method, "per_class": per_class, "seeds": len(acc),
                             "mean": round(statistics.fmean(acc), 4), "std": round(std, 4),
                             "min": min(acc), "max": max(acc)})  # fmt: skip
    return rows


def write_outputs(out: Path, runs: list[dict], rows: list[dict], title: str) -> None:
    from graft.io.atomic import atomic_path

    for name, table in (("results.csv", runs), ("table.csv", rows)):
        with atomic_path(out / name) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    sizes = sorted({r["per_class"] for r in rows})
    lines = [
        f"Test accuracy on Fashion-MNIST classes 5-9 ({title}): mean ± std over seeds [min, max]",
        "",
        "| method | " + " | ".join(f"{n} / class" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in METHODS:
        cells = {r["per_class"]: r for r in rows if r["method"] == method}
        lines.append(
            f"| {method} | "
            + " | ".join(
                f"{c['mean']:.3f} ± {c['std']:.3f} [{c['min']:.3f}, {c['max']:.3f}]"
                if (c := cells.get(n))
                else "-"
                for n in sizes
            )
            + " |"
        )
    with atomic_path(out / "table.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in METHODS:
        cells = sorted((r for r in rows if r["method"] == method), key=lambda r: r["per_class"])
        x = [c["per_class"] for c in cells]
        ax.plot(x, [c["mean"] for c in cells], marker="o", label=method)
        ax.fill_between(x, [c["min"] for c in cells], [c["max"] for c in cells], alpha=0.2)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test accuracy, classes 5-9 (band: min-max over seeds)")
    ax.set_title(f"ViT pretrained on Fashion-MNIST 0-4, transferred to 5-9\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "transfer.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/vision-transfer"), help="folder for the results"
    )
    parser.add_argument("--labels", default="10,100,1000", help="labelled images per class, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="a comma-separated subset")
    parser.add_argument("--dim", type=int, default=64, help="the ViT's width (4 heads, 4 blocks)")
    parser.add_argument("--pretrain-epochs", type=float, default=5)
    parser.add_argument("--pretrain-limit", type=int, default=0, help="pretraining images (0: all 30,000)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every transfer run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a few steps and images: check the script runs")
    args = parser.parse_args()
    try:
        import graft  # noqa: F401
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    require_fashion_mnist()
    sizes = counts("--labels", args.labels)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        fail(f"--methods: unknown {unknown[0]!r} (known: {', '.join(METHODS)})")
    if args.small:
        args.pretrain_limit, args.pretrain_epochs, args.steps, args.seeds, args.dim = 512, 1, 5, 1, 32
        sizes = [2, 4]

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder = args.out / "pretrained"
    figures: dict[str, Any] = pretrain(args, folder)
    pool, test = records("train", TARGET), records("test", TARGET)
    if args.small:
        test = test[:200]
    runs = []
    for per_class in sizes:
        for method in methods:
            for seed in range(args.seeds):
                run = transfer(args, folder, method, per_class, seed, pool, test)
                runs.append(run)
                print(f"{method:8s} {per_class:5d}/class seed {seed}: accuracy {run['accuracy']:.4f} "
                      f"({run['trainable']:,} trainable, {run['seconds']:.0f} s)", flush=True)  # fmt: skip
    rows = summary(runs)
    title = (
        f"ViT {args.dim}x4, {figures['pretrain_images']} pretraining images, {args.pretrain_epochs:g} epochs; "
        f"{args.steps} steps per transfer run, {args.seeds} seeds"
    )
    write_outputs(args.out, runs, rows, title)
    figures.update({"dim": args.dim, "steps": args.steps, "seeds": args.seeds, "small": args.small,
                    "wall_seconds": round(time.perf_counter() - start, 1),
                    **{f"{r['method']}_{r['per_class']}": r["mean"] for r in rows}})  # fmt: skip
    print(f"wrote {args.out}/table.md, table.csv, results.csv and transfer.png")
    emit(figures)


if __name__ == "__main__":
    main()
