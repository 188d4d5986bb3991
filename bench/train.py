"""Fine-tuning all-MiniLM-L6-v2 on BBC News: graft's Trainer vs transformers' Trainer, side by side.

Same data split (80/20, stratified, seed 0), max length 128, batch 16, 1 epoch, AdamW (lr 5e-5,
weight decay 0.01, no decay on biases and norms), linear schedule with 10% warm-up, clipping at 1.0,
dropout as in the checkpoint, seed 0, the same precision. For each precision (fp32, bf16
autocast) it prints examples/s of both, the ratio, both test accuracies, and graft's model FLOPs
utilization against the matrix-multiply peak measured in this run; it ends with one JSON line.

    python bench/train.py [--precision fp32 bf16] [--limit N] [--compile] [--reference]

``--reference`` trains graft's model as graft.nn's plain reference (recipe ``model.kernels: false``)
instead of on its CPU kernels: run it after a default run to see how much the kernels gain here.

Throughput is examples trained per second of the training loop (model loading and the test
evaluation excluded; graft tokenizes inside its loop, transformers before it).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import bbc_folder, emit, fail, minilm_folder

MAX_LENGTH, BATCH, LR, WEIGHT_DECAY, WARMUP, SEED = 128, 16, 5e-5, 0.01, 0.1, 0


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """Best GFLOP/s of an n x n matrix product: the machine's practical peak, measured now."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_flops(model, lengths: list[int]) -> float:
    """Training FLOPs (forward + backward = 3 x forward, 2 per multiply-add) a classifier needs.

    Every block but the last runs on every token. The classifier reads one position, so the
    last block needs keys and values of every token but queries, output projection and
    feed-forward only for that position (graft computes just that; see Transformer.forward).
    Embedding lookups are not multiplies and are not counted.
    """
    cfg = model.config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    block = 4 * h * h + 2 * h * i  # multiply-adds per token of one block's projections
    head = sum(p.numel() for p in model.head.parameters() if p.ndim == 2) + h * h * cfg.pooler
    total = 0.0
    for t in lengths:
        projections = (L - 1) * block * t + 2 * h * h * t + (block - 2 * h * h) + head
        attention = 2 * h * t * t * (L - 1) + 2 * h * t  # Q K^T and (probs) V
        total += 3 * 2 * (projections + attention)
    return total


def load_data():
    from graft.data import DataSpec, load_splits

    splits = load_splits(
        DataSpec(
            train=str(bbc_folder()), val_fraction=0.0, test_fraction=0.2, seed=SEED, replace_bad_utf8=True
        )
    )
    return list(splits["train"]), list(splits["test"]), splits["train"].label_map


def warmup_steps(n_train: int) -> int:
    return math.ceil(WARMUP * math.ceil(n_train / BATCH))


class Baton:
    """Two trainers in two threads take turns, one optimizer step each: both see the same machine load.

    Each side's time is the sum of its own steps; waiting for the other side is not counted.
    """

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.turn = "graft"
        self.done: set[str] = set()
        self.seconds = {"graft": 0.0, "transformers": 0.0}
        self.started: dict[str, float] = {}

    @staticmethod
    def other(side: str) -> str:
        return "transformers" if side == "graft" else "graft"

    def begin(self, side: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == side or self.other(side) in self.done)
        self.started[side] = time.perf_counter()

    def end(self, side: str) -> None:
        self.seconds[side] += time.perf_counter() - self.started[side]
        with self.cv:
            self.turn = self.other(side)
            self.cv.notify_all()

    def finish(self, side: str) -> None:
        with self.cv:
            self.done.add(side)
            self.turn = self.other(side)
            self.cv.notify_all()


def graft_side(
    train, label_map, precision: str, compile_model: bool, out: Path, baton: Baton | None, reference: bool
):
    """(run(), evaluate(test)) for graft's Trainer (on graft.nn's plain reference with ``reference``)."""
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer
    from graft.train import Trainer
    from graft.train.build import token_lengths
    from graft.train.config import Recipe, build

    recipe: Recipe = build(
        Recipe,
        {
            "model": {"path": str(minilm_folder()), "kernels": not reference},
            "data": {"max_length": MAX_LENGTH},
            "task": {"name": "classification"},
            "optim": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "linear", "warmup_steps": warmup_steps(len(train))},
            "train": {"output": str(out), "epochs": 1, "batch_size": BATCH, "precision": precision, "seed": SEED,
                      "clip_norm": 1.0, "group_by_length": True, "compile": compile_model, "plots": False,
                      "log_every": 10},
            "checkpoint": {"keep": 0, "save_model": False},
        },
        "bench",
    )  # fmt: skip
    tokenizer = Tokenizer.from_folder(minilm_folder())
    torch.manual_seed(SEED)
    model = load_model(
        minilm_folder(),
        task="classification",
        id2label=label_map.id2label,
        kernels=recipe.model.kernels,
        to_train=True,
    )
    head = model.head
    lengths = token_lengths(train, tokenizer, MAX_LENGTH)

    def collate(records):
        return head.collate(records, tokenizer, MAX_LENGTH)

    # graft's kernels time their routes at their first use: here, not in the timed steps
    with torch.random.fork_rng(), torch.no_grad():
        model(**collate(train[:BATCH]))

    trainer = Trainer(model, recipe, train, collate, lengths=lengths, quiet=True)
    if baton is not None:
        step = trainer.train_step

        def train_step(micro):
            baton.begin("graft")
            try:
                return step(micro)
            finally:
                baton.end("graft")

        trainer.train_step = train_step

    def run() -> float:
        try:
            return trainer.fit()["train_seconds"]
        finally:
            if baton is not None:
                baton.finish("graft")

    def evaluate(test) -> float:
        predictions = []
        model.eval()
        with torch.no_grad(), trainer.autocast():
            for i in range(0, len(test), 64):
                batch = collate(test[i : i + 64])
                predictions += head.postprocess(model(**batch).logits, batch)
        return head.evaluate(predictions, test)["accuracy"]

    return run, evaluate, model_flops(model, lengths)


def transformers_side(train, label_map, precision: str, out: Path, baton: Baton | None):
    """(run(), evaluate(test)) for transformers' Trainer."""
    import transformers as tr

    tr.logging.set_verbosity_error()
    folder = minilm_folder()
    tokenizer = tr.AutoTokenizer.from_pretrained(folder)
    id2label = dict(enumerate(label_map.id2label))

    def encode(records):
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=MAX_LENGTH)
        return [
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": types,
                "labels": label_map.label2id[r["label"]],
            }
            for ids, mask, types, r in zip(
                enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], records, strict=True
            )
        ]

    tr.set_seed(SEED)
    model = tr.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        attn_implementation="sdpa",
    )  # fmt: skip
    args = tr.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=64, num_train_epochs=1,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_steps=warmup_steps(len(train)), lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=SEED, bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=50, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip

    class Turns(tr.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            baton.begin("transformers")

        def on_step_end(self, args, state, control, **kwargs):
            baton.end("transformers")

    trainer = tr.Trainer(
        model=model, args=args, train_dataset=encode(train), data_collator=tr.DataCollatorWithPadding(tokenizer),
        callbacks=[Turns()] if baton is not None else None,
    )  # fmt: skip

    def run() -> float:
        start = time.perf_counter()
        try:
            trainer.train()
        finally:
            if baton is not None:
                baton.finish("transformers")
        return time.perf_counter() - start

    def evaluate(test) -> float:
        predictions = trainer.predict(encode(test))
        return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())

    return run, evaluate


def run_both(
    train, test, label_map, precision: str, compile_model: bool, tmp: Path, interleave: bool, reference: bool
) -> dict:
    baton = Baton() if interleave else None
    g_run, g_eval, flops = graft_side(
        train, label_map, precision, compile_model, tmp / "graft", baton, reference
    )
    h_run, h_eval = transformers_side(train, label_map, precision, tmp / "hf", baton)
    seconds, errors = {}, []

    def call(side, fn):
        try:
            seconds[side] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    if interleave:
        threads = [
            threading.Thread(target=call, args=(s, f)) for s, f in (("graft", g_run), ("transformers", h_run))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        seconds = baton.seconds  # step time only, the other side's turns excluded
    else:
        call("graft", g_run)
        call("transformers", h_run)
        if errors:
            raise errors[0]
    return {
        "graft_seconds": seconds["graft"],
        "transformers_seconds": seconds["transformers"],
        "graft_accuracy": g_eval(test),
        "transformers_accuracy": h_eval(test),
        "flops": flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--limit", type=int, default=0, help="train on the first N training articles (0 = all)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile graft's model")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="train graft's model as graft.nn's plain reference, without its CPU kernels",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one trainer after the other instead of taking turns step by step",
    )
    args = parser.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        fail("pip install transformers accelerate (the reference side)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    train, test, label_map = load_data()
    if args.limit:
        train = train[: args.limit]
    print(f"BBC News: {len(train)} training and {len(test)} test articles, {len(label_map)} classes; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    figures: dict = {"train_examples": len(train), "graft": "reference" if args.reference else "kernels"}
    for precision in args.precision:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak = matmul_peak(dtype)
        row: dict = {"matmul_peak_gflops": round(peak, 1)}
        with tempfile.TemporaryDirectory() as tmp:
            r = run_both(
                train,
                test,
                label_map,
                precision,
                args.compile,
                Path(tmp),
                not args.sequential,
                args.reference,
            )
        g_speed, h_speed = len(train) / r["graft_seconds"], len(train) / r["transformers_seconds"]
        row.update(
            graft_examples_per_s=round(g_speed, 2),
            transformers_examples_per_s=round(h_speed, 2),
            ratio=round(g_speed / h_speed, 3),
            graft_accuracy=round(r["graft_accuracy"], 4),
            transformers_accuracy=round(r["transformers_accuracy"], 4),
            graft_mfu=round(r["flops"] / r["graft_seconds"] / (peak * 1e9), 3),
        )
        figures[precision] = row
        print(f"{precision}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    emit(figures)


if __name__ == "__main__":
    main()
