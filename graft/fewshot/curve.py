"""The transfer curve (``graft curve``): test accuracy against labelled examples per class, per method.

For each number of labels per class k (0, 8, 32..., or all) and each seed, k examples of each class
are drawn from the recipe's training split (seeded; "all" takes the split whole), and each method
learns from them; every method is scored on the same test split (the recipe's test file or
data.test_fraction). The methods:

- ``zeroshot`` (k = 0 only): the recipe's model with the class names, a sentence encoder's
  similarity or a causal LM's calibrated verbalizer (graft.fewshot.verbalizer);
- ``icl``: a chat model (``chat_model``) shown the k examples per class (k <= ``icl_max``), on the
  first ``icl_limit`` test rows of a seeded shuffle (each row costs a long prompt);
- ``setfit``: contrastive pairs, then a logistic-regression head (graft.fewshot.setfit), at most
  ``setfit_pairs`` pairs;
- ``features``, ``lora``, ``full``: graft's train path with that strategy, on the recipe's optimizer
  and schedule, for max(train.epochs, enough epochs for ``min_steps`` steps) and no validation
  split (a few-shot learner has none to spare): the final model is scored.

``overrides`` are recipe keys per method ({"lora": {"optim.lr": 3e-4}}), over METHOD_DEFAULTS
(LoRA at 1e-3: the recipe's learning rate is a full fine-tuning one). curve.csv (one row per run)
is rewritten after every run, so a stopped curve resumes (a call with --resume may add other counts
or methods; the table and plot show every run in curve.csv); curve.md (mean +- standard deviation
over the seeds) and curve.png (mean lines, bands of +- one standard deviation) at the end. Every
file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from graft.errors import GraftError, did_you_mean
from graft.io.atomic import atomic_path, write_text

METHODS = ("zeroshot", "icl", "setfit", "features", "lora", "full")
STRATEGIES = ("features", "lora", "full")
FIELDS = ("method", "labels", "seed", "accuracy", "examples", "test", "seconds")
# a recipe's learning rate is one for full fine-tuning; LoRA's usual one is 20x larger (at the
# recipe's 5e-5 it reached 0.28 accuracy on BBC News at 8 labels per class, 0.95 at 1e-3).
# --set METHOD:KEY=VALUE overrides these.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"lora": {"optim.lr": 1e-3}}


def parse_labels(text: str) -> list[int | None]:
    """'0,8,32,all' -> [0, 8, 32, None] (None: the whole training split), in increasing order."""
    counts: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            counts.append(None)
        elif part.isdigit():
            counts.append(int(part))
        else:
            raise GraftError(f"--labels {text!r}: {part!r} is not a count of labels per class or 'all'")
    if len(set(counts)) != len(counts):
        raise GraftError(f"--labels {text!r}: a count is given twice")
    return sorted(counts, key=lambda k: math.inf if k is None else k)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise GraftError(
                f"--methods: unknown method {m!r}{did_you_mean(m, METHODS)} (known: {', '.join(METHODS)})"
            )
    if not methods:
        raise GraftError(f"--methods: none given (known: {', '.join(METHODS)})")
    return methods


def shown(k: int | None) -> str:
    return "all" if k is None else str(k)


def per_class(labels: Sequence[str], k: int | None, seed: int) -> list[int]:
    """Indices of k examples of each class (all of a class with fewer), drawn with ``seed``; None: all."""
    if k is None:
        return list(range(len(labels)))
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    rng = random.Random(seed)
    return sorted(i for name in sorted(groups) for i in rng.sample(groups[name], min(k, len(groups[name]))))


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def points(
    methods: Sequence[str], counts: Sequence[int | None], seeds: int, icl_max: int
) -> list[tuple[str, int | None, int]]:
    """(method, k, seed) of every run: zeroshot only at 0 (and once: it draws nothing), the others only
    above 0, icl up to icl_max."""
    runs = []
    for method in methods:
        ks = [k for k in counts if (k == 0) == (method == "zeroshot")]
        if method == "icl":
            ks = [k for k in ks if k is not None and k <= icl_max]
        if not ks:
            need = "0 in --labels" if method == "zeroshot" else f"a count in --labels from 1 to {icl_max}" if method == "icl" else "a count above 0 in --labels"  # fmt: skip
            raise GraftError(f"--methods {method}: nothing to run (it needs {need})")
        runs += [(method, k, s) for k in ks for s in range(1 if method == "zeroshot" else seeds)]
    return runs


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(FIELDS):
        raise GraftError(
            f"{path}: not a curve.csv ({', '.join(FIELDS)}); choose another --out or pass --overwrite"
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, labels): mean and standard deviation of the accuracy over the seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["labels"])), []).append(float(r["accuracy"]))
    return [
        {"method": m, "labels": k, "mean": statistics.fmean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0, "runs": len(a)}
        for (m, k), a in groups.items()
    ]  # fmt: skip


def markdown(rows: list[dict[str, Any]], counts: Sequence[int | None], methods: Sequence[str]) -> str:
    """Methods as rows, labels per class as columns: mean +- std (runs)."""
    cells = {(s["method"], s["labels"]): s for s in summary(rows)}
    header = "| method | " + " | ".join(f"{shown(k)} / class" for k in counts) + " |"
    lines = [header, "|---|" + "---|" * len(counts)]
    for m in methods:
        row = []
        for k in counts:
            s = cells.get((m, shown(k)))
            row.append(f"{s['mean']:.3f} ± {s['std']:.3f} ({s['runs']})" if s else "")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, Any]], counts: Sequence[int | None], methods: Sequence[str], path: Path
) -> bool:
    """curve.png: accuracy against labels per class (evenly spaced), a line and a +-1 std band per method."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(s["method"], s["labels"]): s for s in summary(rows)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        xs = [i for i, k in enumerate(counts) if (m, shown(k)) in cells]
        mean = [cells[(m, shown(counts[i]))]["mean"] for i in xs]
        std = [cells[(m, shown(counts[i]))]["std"] for i in xs]
        line = ax.plot(xs, mean, marker="o", label=m)[0]
        low = [a - b for a, b in zip(mean, std, strict=True)]
        high = [a + b for a, b in zip(mean, std, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xticks(range(len(counts)), [shown(k) for k in counts])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def run_curve(
    recipe: Any,
    counts: Sequence[int | None],
    methods: Sequence[str],
    seeds: int,
    out: Path,
    chat_model: str | None = None,
    icl_limit: int | None = 200,
    icl_max: int = 8,
    icl_tokens: int = 64,
    setfit_iterations: int = 20,
    setfit_pairs: int = 4000,
    min_steps: int = 50,
    overrides: dict[str, dict[str, Any]] | None = None,
    resume: bool = False,
    quiet: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Run every (method, labels, seed) not yet in out/curve.csv; write curve.csv, curve.md, curve.png."""
    from graft.data import load_splits

    if recipe.task.name != "classification" or recipe.data.label_kind != "class":
        raise GraftError(f"curve: the recipe's task is {recipe.task.name} ({recipe.data.label_kind} labels); the curve needs single-label classification")  # fmt: skip
    runs = points(methods, counts, seeds, icl_max)
    if "icl" in methods and not chat_model:
        raise GraftError("--methods icl: needs a chat model (--chat-model MODEL, e.g. SmolLM2-135M-Instruct)")
    overrides = overrides or {}
    splits = load_splits(recipe.data)
    if "test" not in splits:
        raise GraftError("curve: the recipe has no test split (data.test, or data.test_fraction > 0)")
    train = [{"text": r["text"], "label": str(r["label"])} for r in splits["train"]]
    test = [{"text": r["text"], "label": str(r["label"])} for r in splits["test"]]
    classes = sorted({r["label"] for r in train})
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_jsonl(data / "test.jsonl", test)
    done = read_rows(out / "curve.csv") if resume else []
    rows = list(done)
    have = {(r["method"], r["labels"], int(r["seed"])) for r in done}
    for method, k, seed in runs:
        if (method, shown(k), seed) in have:
            continue
        picked = per_class([r["label"] for r in train], k, seed)
        subset = [train[i] for i in picked]
        log(f"curve: {method} with {shown(k)} labels per class ({len(subset)} examples), seed {seed}")
        t0 = time.perf_counter()
        runner = {"zeroshot": zeroshot_run, "icl": icl_run, "setfit": setfit_run}.get(method, strategy_run)
        predicted, gold = runner(
            recipe=recipe, method=method, k=k, seed=seed, subset=subset, test=test, classes=classes, out=out,
            chat_model=chat_model, icl_limit=icl_limit, icl_tokens=icl_tokens, setfit_iterations=setfit_iterations,
            setfit_pairs=setfit_pairs, min_steps=min_steps, overrides=overrides.get(method, {}), quiet=quiet,
        )  # fmt: skip
        rows.append({
            "method": method, "labels": shown(k), "seed": seed, "accuracy": round(accuracy(predicted, gold), 6),
            "examples": len(subset), "test": len(gold), "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
        log(f"curve: {method} {shown(k)}/class seed {seed}: accuracy {rows[-1]['accuracy']:.4f}")
        write_csv(out / "curve.csv", rows)
    write_csv(out / "curve.csv", rows)
    # the whole curve: runs kept from earlier calls (--resume) with other counts or methods too
    seen = {shown(k) for k in counts} | {r["labels"] for r in rows}
    all_counts = parse_labels(",".join(sorted(seen)))
    all_methods = [m for m in METHODS if m in methods or any(r["method"] == m for r in rows)]
    write_text(out / "curve.md", markdown(rows, all_counts, all_methods))
    plot(rows, all_counts, all_methods, out / "curve.png")
    return rows


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def zeroshot_run(
    recipe: Any, classes: Sequence[str], test: Sequence[dict[str, Any]], **_: Any
) -> tuple[list[str], list[str]]:
    """The recipe's model names each test text's class, given only the class names."""
    from graft.fewshot.verbalizer import causal_lm_scores, encoder_scores, text_model_kind
    from graft.io.hf import resolve
    from graft.loading import load_config, load_model
    from graft.tokenizer import Tokenizer

    folder = resolve(recipe.model.path)
    family, _ = load_config(folder)
    kind = text_model_kind(family, recipe.model.path)
    tokenizer = Tokenizer.from_folder(folder)
    model = load_model(
        folder, task="causal-lm" if kind == "causal-lm" else "base", kernels=recipe.model.kernels
    ).eval()
    texts = [r["text"] for r in test]
    if kind == "causal-lm":
        scores = causal_lm_scores(model, tokenizer, texts, classes, max_tokens=recipe.data.max_length)
    else:
        scores = encoder_scores(model, tokenizer, texts, classes, max_length=recipe.data.max_length)
    return [classes[i] for i in scores.argmax(-1).tolist()], [r["label"] for r in test]


def icl_run(
    chat_model: str, k: int, seed: int, subset: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]],
    classes: Sequence[str], icl_limit: int | None, icl_tokens: int, **_: Any,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """The chat model shown the k examples per class, on the first icl_limit test rows of a seeded shuffle."""
    from graft.fewshot.icl import icl_scores
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    folder = resolve(chat_model)
    tokenizer = Tokenizer.from_folder(folder)
    model = load_model(folder, task="causal-lm").eval()
    order = list(range(len(test)))
    random.Random(0).shuffle(order)  # the same rows for every k and seed
    queries = [test[i] for i in order[:icl_limit]]
    scores = icl_scores(
        model, tokenizer, [r["text"] for r in queries], [r["text"] for r in subset], [r["label"] for r in subset],
        classes, classes, k, seed=seed, max_tokens=icl_tokens,
    )  # fmt: skip
    return [classes[i] for i in scores.argmax(-1).tolist()], [r["label"] for r in queries]


def run_recipe_for(recipe: Any, method: str, k: int | None, seed: int, n: int, out: Path, min_steps: int,
                   overrides: dict[str, Any], strategy: str) -> Any:  # fmt: skip
    """The recipe of one run: its own folder and seed, no checkpoints or plots, enough epochs."""
    from graft.train.config import with_overrides

    steps_per_epoch = math.ceil(n / (recipe.train.batch_size * recipe.train.accumulate))
    epochs = max(recipe.train.epochs, math.ceil(min_steps / steps_per_epoch))
    values = {
        "strategy.name": strategy, "strategy.options": {} if strategy != recipe.strategy.name else recipe.strategy.options,
        "train.output": str(out / "runs" / f"{method}-{shown(k)}-{seed}"), "train.seed": seed, "train.epochs": epochs,
        "train.plots": False, "train.max_steps": 0, "checkpoint.keep": 0, "checkpoint.save_model": False,
        "early_stopping.patience": 0, "eval.metric": "loss",
    }  # fmt: skip
    return with_overrides(recipe, {**values, **METHOD_DEFAULTS.get(method, {}), **overrides})


def setfit_run(
    recipe: Any, method: str, k: int | None, seed: int, subset: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]],
    classes: Sequence[str], out: Path, setfit_iterations: int, setfit_pairs: int, overrides: dict[str, Any], quiet: bool,
    **_: Any,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """SetFit on the subset: one epoch over its pairs (SetFit's default), at most setfit_pairs of them."""
    from graft.fewshot.setfit import train_setfit

    iterations = max(1, min(setfit_iterations, setfit_pairs // (2 * len(subset))))
    pairs = min(2 * iterations * len(subset), setfit_pairs)
    run = run_recipe_for(
        recipe, method, k, seed, pairs, out, 0, {"train.epochs": 1, **overrides}, recipe.strategy.name
    )
    texts, labels = [r["text"] for r in subset], [r["label"] for r in subset]
    tuned = train_setfit(run, texts, labels, classes, iterations, quiet, max_pairs=setfit_pairs)
    return tuned.predict([r["text"] for r in test]), [r["label"] for r in test]


def strategy_run(
    recipe: Any, method: str, k: int | None, seed: int, subset: Sequence[dict[str, Any]], out: Path,
    min_steps: int, overrides: dict[str, Any], quiet: bool, **_: Any,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """graft's train path with the method's strategy on the subset; the final model on the test split."""
    from graft.train.build import build_trainer

    data = out / "data"
    train_file = data / f"train-{shown(k)}-{seed}.jsonl"
    write_jsonl(train_file, subset)
    values = {
        "data.train": str(train_file), "data.validation": None, "data.test": str(data / "test.jsonl"),
        "data.format": "jsonl", "data.columns": {}, "data.val_fraction": 0.0, "data.test_fraction": 0.0,
        **overrides,
    }  # fmt: skip
    run = run_recipe_for(recipe, method, k, seed, len(subset), out, min_steps, values, method)
    trainer = build_trainer(run, quiet=quiet)
    trainer.fit(overwrite=True)
    predicted, gold = [], []
    for records, batch in eval_batches(trainer):
        logits = trainer.module(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for p, r in zip(trainer.module.head.postprocess(logits, batch), records, strict=True):
            predicted.append(str(p["label"]))
            gold.append(str(r["label"]))
    return predicted, gold


def eval_batches(trainer: Any, size: int = 32):
    """(records, batch) over the trainer's test split, in evaluation mode."""
    import torch

    from graft.tasks.collate import to_device

    trainer.module.eval()
    data = trainer.test_data
    with torch.inference_mode():
        for start in range(0, len(data), size):
            records = [data[i] for i in range(start, min(start + size, len(data)))]
            yield records, to_device(trainer.collate(records), trainer.device)
