"""Transfer strategies side by side on BBC News with all-MiniLM-L6-v2: graft vs transformers' Trainer + PEFT.

graft trains full, features, bitfit, lora and adapter; the reference trains full and lora with
transformers' Trainer (+ PEFT), with the same split, tokenizer, head, hyperparameters and
warm-up. Every run is a fresh process, so its peak memory is its own. Prints test accuracy,
trainable parameters, training examples/s and peak memory, then the graft/reference ratios and
the issue's goals; ends with one JSON line.

Memory, three ways on CPU: the peak RSS of the training run (what the OS saw, glibc's retained
free memory included); the peak "live" memory of a second, short run (--memory-steps) whose C
library returns freed memory at once, so its peak RSS is the peak of what was in use; and the
peak "tensor" memory, that live peak less the process before the model was loaded (Python,
torch, the libraries, the data, the tokenizer): weights, gradients, optimizer state and
activations, what torch.cuda.max_memory_allocated counts on a GPU (used there instead).

    python -m bench.strategies [--train N] [--epochs E] [--max-length T] [--only lora,full] [--seeds S]

With --seeds S every run repeats with seeds 0..S-1 (head initialization, data order, dropout)
and the table and goals use the mean: one test article is 0.22 points, so one seed cannot
tell a 0.5-point gap from noise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import random
import resource
from typing import Any

import torch

from bench.common import bbc_folder, emit, fail, minilm_folder, scratch

# strategy -> (graft spec, learning rate); the reference uses the same lr for the same strategy
RUNS = {
    "full": ("full", 1e-4),
    "features": ("features", 3e-3),
    "bitfit": ("bitfit", 1e-3),
    "lora": ("lora:r=16,alpha=32,targets=q+v", 3e-3),
    "adapter": ("adapter:pfeiffer,size=32", 1e-3),
}
REFERENCE = ("full", "lora")


def splits(args) -> tuple[list[dict], list[dict], list[str]]:
    """graft's stratified, seeded split of BBC News: the same records for both systems."""
    from graft.data import DataSpec, load_splits

    parts = load_splits(
        DataSpec(train=str(bbc_folder()), val_fraction=0.0, test_fraction=0.2, seed=0, replace_bad_utf8=True)
    )
    train, test = list(parts["train"]), list(parts["test"])
    random.Random(0).shuffle(train)  # the splits come in folder (label) order; a prefix must mix labels
    random.Random(1).shuffle(test)
    labels = list(parts["train"].label_map.id2label)
    return train[: args.train or None], test[: args.test or None], labels


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now_mb(device: str) -> float:
    """Memory in use now: what a run holds before training (model, data, libraries)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def process_mb(device: str) -> float:
    """Memory before the model: Python, torch (with torch._dynamo, which torch.optim imports),
    the libraries, the data and the tokenizer. What a run adds on top of it is tensors: weights,
    gradients, optimizer state, activations; on CUDA, what max_memory_allocated counts."""
    import torch._dynamo  # noqa: F401

    return 0.0 if device == "cuda" else now_mb(device)


def warmup_steps(args, n_train: int) -> int:
    return math.ceil(0.1 * args.epochs * math.ceil(n_train / args.batch_size))


def run_graft(args, name: str, seed: int, memory_steps: int = 0) -> dict[str, Any]:
    from graft.loading import load_model
    from graft.strategies import apply_strategy, count_parameters
    from graft.tokenizer import Tokenizer
    from graft.train.config import load_recipe
    from graft.train.loop import Trainer

    torch.manual_seed(seed)
    spec, lr = RUNS[name]
    train, test, labels = splits(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = Tokenizer.from_folder(minilm_folder())
    process = process_mb(device)
    model = load_model(minilm_folder(), task="classification", id2label=labels, to_train=True)
    model = apply_strategy(model, spec)
    count = count_parameters(model)
    out = str(scratch("graft-bench-"))
    recipe = load_recipe(
        base={
            "optim": {"lr": lr, "weight_decay": 0.01},
            "schedule": {"name": "linear", "warmup_steps": warmup_steps(args, len(train))},
            "train": {
                "output": out,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": seed,
                "max_steps": memory_steps,
                "device": device,
                "plots": False,
                "log_every": 1000,
            },  # fmt: skip
            "checkpoint": {"save_model": False, "keep": 1},
        }
    )
    head = model.head

    def collate(records):
        return head.collate(records, tokenizer, args.max_length)

    trainer = Trainer(model, recipe, train, collate, None, quiet=True)
    loaded = now_mb(device)
    trainer.fit()
    if memory_steps:
        return {"peak_mb": peak_mb(device), "loaded_mb": loaded, "process_mb": process}
    # the trainer's own figure: examples over the time of the steps alone (not the final checkpoint)
    logged = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"examples_per_s"' in line]
    speed = logged[-1]["examples_per_s"]
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = collate(test[i : i + 64])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return {
        "system": "graft", "strategy": name, "seed": seed, "accuracy": correct / len(test), "trainable": count.trainable,
        "total": count.total, "examples_per_s": speed, "peak_mb": peak_mb(device), "loaded_mb": loaded,
    }  # fmt: skip


def run_reference(args, name: str, seed: int, memory_steps: int = 0) -> dict[str, Any]:
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    _, lr = RUNS[name]
    train, test, labels = splits(args)
    label2id = {label: i for i, label in enumerate(labels)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    process = process_mb(device)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_folder(), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    if name == "lora":
        lora = RUNS["lora"][0]
        assert lora == "lora:r=16,alpha=32,targets=q+v"
        model = get_peft_model(
            model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=["query", "value"])
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def encode(records):
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=args.max_length)
        return [
            {**{k: enc[k][i] for k in enc}, "labels": label2id[str(r["label"])]}
            for i, r in enumerate(records)
        ]

    targs = transformers.TrainingArguments(
        output_dir=str(scratch("hf-bench-")), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=lr, weight_decay=0.01, lr_scheduler_type="linear",
        warmup_steps=warmup_steps(args, len(train)), max_grad_norm=1.0, seed=seed, report_to=[], save_strategy="no",
        max_steps=memory_steps or -1, eval_strategy="no", logging_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    collator = transformers.DataCollatorWithPadding(tokenizer)
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=encode(train), data_collator=collator
    )
    loaded = now_mb(device)
    speed = trainer.train().metrics["train_samples_per_second"]
    if memory_steps:
        return {"peak_mb": peak_mb(device), "loaded_mb": loaded, "process_mb": process}
    model.eval()
    correct = 0
    test_rows = encode(test)
    with torch.no_grad():
        for i in range(0, len(test_rows), 64):
            batch = {k: v.to(device) for k, v in collator(test_rows[i : i + 64]).items()}
            correct += int(
                (
                    model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
                    == batch["labels"]
                ).sum()
            )
    return {
        "system": "reference", "strategy": name, "seed": seed, "accuracy": correct / len(test), "trainable": trainable,
        "total": total, "examples_per_s": float(speed), "peak_mb": peak_mb(device), "loaded_mb": loaded,
    }  # fmt: skip


def mean_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, strategy): the mean over seeds, with the accuracy's range."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["strategy"]), []).append(r)
    rows = []
    for (system, strategy), group in groups.items():
        row: dict[str, Any] = {"system": system, "strategy": strategy, "seeds": len(group)}
        for key in (
            "accuracy",
            "examples_per_s",
            "peak_mb",
            "loaded_mb",
            "live_peak_mb",
            "live_loaded_mb",
            "tensor_peak_mb",
        ):
            if key in group[0]:
                row[key] = sum(r[key] for r in group) / len(group)
        row["accuracy_min"] = min(r["accuracy"] for r in group)
        row["accuracy_max"] = max(r["accuracy"] for r in group)
        row["trainable"], row["total"] = group[0]["trainable"], group[0]["total"]
        rows.append(row)
    return rows


def in_fresh_process(fn, *args, env: dict[str, str] | None = None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    os.environ.update(env or {})  # the child's C library reads them when it starts
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(fn, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# glibc keeps freed memory for reuse and, fragmented, gives little of it back: a process's peak
# RSS is what it needed plus what its allocator held. With every block over 64 KiB mapped on
# its own, freed memory goes back to the OS at once and peak RSS is the peak of what was live:
# the CPU counterpart of torch.cuda.max_memory_allocated (plus the process itself). Slower, so
# measured in a separate short run of the same training.
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def with_live_memory(args, fn, name: str, seed: int) -> dict[str, Any]:
    """A run of fn, plus its peak live memory from a short run that returns freed memory."""
    row = in_fresh_process(fn, args, name, seed)
    if args.memory_steps and not torch.cuda.is_available():
        live = in_fresh_process(fn, args, name, seed, args.memory_steps, env=RETURN_FREED)
        row["live_peak_mb"], row["live_loaded_mb"] = live["peak_mb"], live["loaded_mb"]
        row["tensor_peak_mb"] = live["peak_mb"] - live["process_mb"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=0, help="training articles (0 = all 1,780)")
    parser.add_argument("--test", type=int, default=0, help="test articles (0 = all 445)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--only", default="", help="comma-separated strategies (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..S-1 and average")
    parser.add_argument(
        "--memory-steps", type=int, default=30, help="steps of the live-memory run on CPU (0: no such run)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip transformers + PEFT")
    args = parser.parse_args()
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        fail(f"the reference needs transformers and peft ({e})")
    chosen = [s for s in (args.only.split(",") if args.only else RUNS) if s]
    runs = []
    for seed in range(args.seeds):
        for name in chosen:
            runs.append(with_live_memory(args, run_graft, name, seed))
            print(f"graft      {name:<9} {runs[-1]}", flush=True)
            if name in REFERENCE and not args.no_reference:
                runs.append(with_live_memory(args, run_reference, name, seed))
                print(f"reference  {name:<9} {runs[-1]}", flush=True)
    rows = mean_rows(runs)

    live = all("live_peak_mb" in r for r in rows)
    print(
        f"\n{'system':<10} {'strategy':<9} {'test acc':>8} {'(min-max)':>13} {'trainable':>11} {'% params':>8} "
        f"{'ex/s':>7} {'peak MB':>8} {'added MB':>8}" + (f" {'live MB':>8} {'tensors':>8}" if live else "")
    )
    for r in rows:
        print(f"{r['system']:<10} {r['strategy']:<9} {r['accuracy']:>8.4f} {r['accuracy_min']:>6.4f}-{r['accuracy_max']:.4f} "
              f"{r['trainable']:>11,} {100 * r['trainable'] / r['total']:>8.3f} {r['examples_per_s']:>7.1f} "
              f"{r['peak_mb']:>8.0f} {r['peak_mb'] - r['loaded_mb']:>8.0f}"
              + (f" {r['live_peak_mb']:>8.0f} {r['tensor_peak_mb']:>8.0f}" if live else ""))  # fmt: skip
    by = {(r["system"], r["strategy"]): r for r in rows}
    figures: dict[str, Any] = {"seeds": args.seeds, "rows": rows, "runs": runs}
    for name in REFERENCE:
        g, ref = by.get(("graft", name)), by.get(("reference", name))
        if g and ref:
            ratios = {
                "accuracy_points": 100 * (g["accuracy"] - ref["accuracy"]),
                "examples_per_s": g["examples_per_s"] / ref["examples_per_s"],
                "peak_mb": g["peak_mb"] / ref["peak_mb"],
            }
            if live:
                ratios["live_peak_mb"] = g["live_peak_mb"] / ref["live_peak_mb"]
                ratios["tensor_peak_mb"] = g["tensor_peak_mb"] / ref["tensor_peak_mb"]
            figures[f"{name}_graft_vs_reference"] = ratios
            print(f"graft/reference {name}: accuracy {ratios['accuracy_points']:+.2f} points (mean of {args.seeds} "
                  f"seed(s); goal: within 0.5), speed x{ratios['examples_per_s']:.2f}, peak RSS x{ratios['peak_mb']:.2f}"
                  + (f", peak live memory x{ratios['live_peak_mb']:.2f}, peak tensor memory x{ratios['tensor_peak_mb']:.2f}"
                     if live else ""))  # fmt: skip
    full, lora = by.get(("graft", "full")), by.get(("graft", "lora"))
    if full and lora:
        goals = {
            "lora_trainable_pct": 100 * lora["trainable"] / lora["total"],
            "lora_minus_full_points": 100 * (lora["accuracy"] - full["accuracy"]),
            "lora_peak_rss_over_full": lora["peak_mb"] / full["peak_mb"],
            # what training added on top of the loaded model, data and libraries
            "lora_added_rss_over_full": (lora["peak_mb"] - lora["loaded_mb"])
            / (full["peak_mb"] - full["loaded_mb"]),
        }
        if live:
            goals["lora_live_peak_over_full"] = lora["live_peak_mb"] / full["live_peak_mb"]
            goals["lora_tensor_peak_over_full"] = lora["tensor_peak_mb"] / full["tensor_peak_mb"]
        figures["goals"] = goals
        print(f"goals: LoRA trains {goals['lora_trainable_pct']:.2f}% (< 1%), is {goals['lora_minus_full_points']:+.2f} "
              f"points from full (within 1), peak memory <= 0.7x full: peak RSS x{goals['lora_peak_rss_over_full']:.2f} "
              f"(x{goals['lora_added_rss_over_full']:.2f} counting only what training adds)"
              + (f", peak live memory x{goals['lora_live_peak_over_full']:.2f} (process included), peak tensor memory "
                 f"x{goals['lora_tensor_peak_over_full']:.2f}" if live else ""))  # fmt: skip
    emit(figures)


if __name__ == "__main__":
    main()
