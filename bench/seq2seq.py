"""Fine-tuning small T5 and BART models: graft's Trainer vs transformers' Seq2SeqTrainer, side by side.

The data: the book's 200 questions, each to the first paragraph of its answer (source -> target),
tokenized by all-MiniLM-L6-v2's WordPiece tokenizer on both sides, sources and targets cut at 128
tokens. The models: random T5 (v1.1 layout: gated GELU) and BART of the same small shape, written
by transformers into a folder that both sides load. Batch 16, 3 epochs (--epochs), AdamW (lr 3e-4, weight
decay 0.01), linear schedule, no warm-up, clipping at 1.0, fp32, seed 0, dropout as configured.
For each family it prints examples/s of both, the ratio and both final training losses; it ends
with one JSON line.

    python bench/seq2seq.py [--families t5 bart] [--limit N] [--epochs N] [--small] [--step]

``--small``: a tiny model and 32 examples, to check that the script runs (not for figures).
Throughput is examples trained per second of the training loop (model loading excluded; graft
tokenizes inside its loop, transformers before it). ``--step`` adds one training step of each on one
thread, timed in CPU seconds (forward, backward and AdamW on the same batch of 16).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import book_questions_and_answers, emit, fail, minilm_folder

MAX_LENGTH, BATCH, LR, WEIGHT_DECAY, SEED = 128, 16, 3e-4, 0.01, 0
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model(family: str, folder: Path, small: bool) -> None:
    """A random model of ``family`` over the WordPiece vocabulary ([PAD] 0, [CLS] 101, [SEP] 102 ends)."""
    import transformers as tr

    d, layers, heads, ff = (32, 1, 2, 64) if small else (256, 4, 4, 1024)
    vocab = 30522
    if family == "t5":
        config = tr.T5Config(
            vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ff, num_layers=layers, num_heads=heads,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=102,
            decoder_start_token_id=0,
        )  # fmt: skip
    else:
        config = tr.BartConfig(
            vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ff,
            decoder_ffn_dim=ff, max_position_embeddings=MAX_LENGTH, pad_token_id=0, bos_token_id=101,
            eos_token_id=102, decoder_start_token_id=102, forced_eos_token_id=102,
        )  # fmt: skip
    torch.manual_seed(SEED)
    tr.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_folder() / name).exists():
            shutil.copy(minilm_folder() / name, folder / name)


def graft_side(folder: Path, records: list[dict], out: Path, epochs: int) -> tuple[float, float]:
    """(seconds, last logged loss) of graft's Trainer."""
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer
    from graft.train import Trainer
    from graft.train.config import Recipe, build
    from graft.train.loggers import read_metrics

    recipe: Recipe = build(
        Recipe,
        {
            "model": {"path": str(folder)},
            "data": {"max_length": MAX_LENGTH},
            "task": {"name": "seq2seq"},
            "optim": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "linear", "warmup_steps": 0},
            "train": {"output": str(out), "epochs": epochs, "batch_size": BATCH, "precision": "fp32", "seed": SEED,
                      "clip_norm": 1.0, "plots": False, "log_every": 1},
            "checkpoint": {"keep": 0, "save_model": False},
        },
        "bench",
    )  # fmt: skip
    tokenizer = Tokenizer.from_folder(folder)
    torch.manual_seed(SEED)
    model = load_model(folder, task="seq2seq", to_train=True)
    head = model.head

    def collate(batch):
        return head.collate(batch, tokenizer, MAX_LENGTH)

    with torch.random.fork_rng(), torch.no_grad():  # the kernels time their routes here, not in the steps
        model(**collate(records[:BATCH]))
    seconds = Trainer(model, recipe, records, collate, quiet=True).fit()["train_seconds"]
    losses = [line["loss"] for line in read_metrics(out) if "loss" in line]
    return seconds, losses[-1]


def transformers_side(folder: Path, records: list[dict], out: Path, epochs: int) -> tuple[float, float]:
    """(seconds, last logged loss) of transformers' Seq2SeqTrainer."""
    import transformers as tr

    tr.logging.set_verbosity_error()
    tokenizer = tr.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(SEED)
    model = tr.AutoModelForSeq2SeqLM.from_pretrained(folder)
    rows = []
    for r in records:
        row = tokenizer(r["text"], max_length=MAX_LENGTH, truncation=True)
        row["labels"] = tokenizer(text_target=r["text_pair"], max_length=MAX_LENGTH, truncation=True)[
            "input_ids"
        ]
        rows.append(dict(row))
    args = tr.Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
        weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, seed=SEED,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    collator = tr.DataCollatorForSeq2Seq(tokenizer, model=model)
    trainer = tr.Seq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.remove_callback(tr.PrinterCallback)  # its log lines would mix with the figures
    result = trainer.train()
    losses = [line["loss"] for line in trainer.state.log_history if "loss" in line]
    return result.metrics["train_runtime"], losses[-1]


def step_seconds(folder: Path, records: list[dict], repeats: int = 3) -> tuple[float, float]:
    """(graft, transformers) CPU seconds of one training step on the same batch (forward, backward,
    AdamW), the best of ``repeats``: process time, so a busy machine's waits do not count."""
    import time

    import transformers as tr

    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    torch.manual_seed(SEED)
    ours = load_model(folder, task="seq2seq", to_train=True).train()
    batch = ours.head.collate(records[:BATCH], Tokenizer.from_folder(folder), MAX_LENGTH)
    ref = tr.AutoModelForSeq2SeqLM.from_pretrained(folder).train()
    sides = [
        (ours, batch),
        (ref, {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels")}),
    ]
    optimizers = [torch.optim.AdamW(model.parameters(), lr=LR) for model, _ in sides]
    best = [float("inf"), float("inf")]
    for round in range(repeats + 1):  # the first round warms up (the kernels time their routes)
        for i, ((model, b), optimizer) in enumerate(zip(sides, optimizers, strict=True)):
            start = time.process_time()
            model(**b).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round:
                best[i] = min(best[i], time.process_time() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["t5", "bart"], choices=["t5", "bart"])
    parser.add_argument("--limit", type=int, default=None, help="Train on the first N pairs.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs each side trains (default 3).")
    parser.add_argument("--small", action="store_true", help="A tiny model and 32 pairs: a smoke run.")
    parser.add_argument(
        "--step", action="store_true", help="Also one training step's CPU time per side, on one thread."
    )
    args = parser.parse_args()
    questions, answers = book_questions_and_answers()
    records = [{"text": q, "text_pair": a} for q, a in zip(questions, answers, strict=True)]
    records = records[: 32 if args.small else args.limit]
    figures: dict = {
        "examples": len(records),
        "epochs": args.epochs,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
    }
    with tempfile.TemporaryDirectory(prefix="graft-bench-seq2seq-") as tmp:
        for family in args.families:
            folder = Path(tmp) / family
            write_model(family, folder, args.small)
            ours, ours_loss = graft_side(folder, records, Path(tmp) / f"{family}-graft", args.epochs)
            theirs, theirs_loss = transformers_side(
                folder, records, Path(tmp) / f"{family}-transformers", args.epochs
            )
            if ours <= 0 or theirs <= 0:
                fail(f"{family}: a side did not train")
            seen = len(records) * args.epochs
            ours_rate, theirs_rate = seen / ours, seen / theirs
            print(
                f"{family}: graft {ours_rate:.1f} examples/s (last loss {ours_loss:.3f}), transformers "
                f"{theirs_rate:.1f} examples/s (last loss {theirs_loss:.3f}): {ours_rate / theirs_rate:.2f}x"
            )
            if args.step:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                ours_step, theirs_step = step_seconds(folder, records)
                torch.set_num_threads(threads)
                print(
                    f"{family}: one step (1 thread, CPU time): graft {ours_step:.3f} s, transformers "
                    f"{theirs_step:.3f} s: {theirs_step / ours_step:.2f}x"
                )
                figures[f"{family}_step"] = {
                    "graft_s": round(ours_step, 4),
                    "transformers_s": round(theirs_step, 4),
                }
            figures[family] = {
                "graft_examples_per_s": round(ours_rate, 2),
                "transformers_examples_per_s": round(theirs_rate, 2),
                "ratio": round(ours_rate / theirs_rate, 3),
                "graft_last_loss": round(ours_loss, 4),
                "transformers_last_loss": round(theirs_loss, 4),
            }
    emit(figures)


if __name__ == "__main__":
    main()
