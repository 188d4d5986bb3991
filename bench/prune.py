"""Pruning's two scopes on the BBC News classifier: ranked across layers (global) or the same share
of every layer (layer), each with the same recovery, against the unpruned model.

A third of the heads and a quarter of the feed-forward neurons go (issue 15's pruning goal),
chosen by Michel et al. importance over --importance training articles, then each pruned model
is recovered by distillation from the unpruned classifier for --recover-epochs with
bench/compress.py's recipe. Accuracy on the test split (bench/strategies.py's seeded 20%);
speed as CPU time on ONE thread (time.thread_time: what the model costs, whatever else the
machine runs), the best of --repeats, at batch 32 on articles at 128 tokens and on short texts
(24 tokens), and per block (attention and feed-forward) at 128, so that where the time goes is
in the table. bench/compress.py is the full, wall-clock comparison; this is the small one.

    python -m bench.prune [--model FOLDER] [--recover-epochs 1] [--importance 512] [--small]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import emit, fail, scratch

BATCH, SHORT, LONG = 32, 24, 128
SCOPES = ("layer", "global")


def cpu_seconds(fn, repeats: int) -> float:
    """The least CPU time of this thread over ``repeats`` calls of fn (after one to warm up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def block_seconds(model, batch: dict, repeats: int) -> list[tuple[float, float]]:
    """(attention, feed-forward) CPU seconds of each block, the least over ``repeats`` forwards."""
    stamps: dict = {}
    handles = []
    for i, block in enumerate(model.body.layers):
        for part, module in (("attn", block.attn), ("ffn", block.ffn)):
            handles.append(module.register_forward_pre_hook(lambda *_, k=(i, part): stamps.__setitem__(
                (k, 0), time.thread_time())))  # fmt: skip
            handles.append(module.register_forward_hook(lambda *_, k=(i, part): stamps.__setitem__(
                (k, 1), time.thread_time())))  # fmt: skip
    best: dict = {}
    try:
        model(**batch)
        for _ in range(repeats):
            model(**batch)
            for k in {k for k, _ in stamps}:
                best[k] = min(best.get(k, float("inf")), stamps[k, 1] - stamps[k, 0])
    finally:
        for h in handles:
            h.remove()
    return [(best[i, "attn"], best[i, "ffn"]) for i in range(len(model.body.layers))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a fine-tuned BBC classifier folder (default: train one)")
    parser.add_argument("--train", type=int, default=0, help="training articles (0 = all 1,780)")
    parser.add_argument("--test", type=int, default=0, help="test articles (0 = all 445)")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="the classifier's epochs, when trained here"
    )
    parser.add_argument("--recover-epochs", type=float, default=1.0, help="epochs of each recovery")
    parser.add_argument(
        "--importance", type=int, default=512, help="training articles scoring heads and neurons"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards; the least CPU time counts")
    parser.add_argument(
        "--keep", default="", help="a folder to keep the trained and pruned models in (default: deleted)"
    )
    parser.add_argument("--small", action="store_true", help="a quick check that everything runs")
    args = parser.parse_args()
    if args.small:
        args.train, args.test, args.recover_epochs, args.importance, args.repeats = 48, 32, 0.35, 16, 1
    try:
        import graft  # noqa: F401
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    torch.set_num_threads(1)
    from bench.compress import batches, fit, train_classifier
    from bench.strategies import splits
    from graft.compress.distill import Distiller
    from graft.compress.prune import prune
    from graft.interpret.heads import importance
    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer

    train, test, labels = splits(args)
    work = scratch("graft-bench-prune-", args.keep)
    folder = Path(args.model) if args.model else train_classifier(args, train, labels, work)
    tokenizer = Tokenizer.from_folder(folder)
    teacher = load_model(folder).eval()
    head = teacher.head
    scoring = [
        head.collate(train[i : i + 16], tokenizer, LONG)
        for i in range(0, min(args.importance, len(train)), 16)
    ]
    gold = torch.tensor(
        [labels.index(r["label"]) if isinstance(r["label"], str) else r["label"] for r in test]
    )
    evaluation = batches(head, tokenizer, test, LONG, 64)

    def accuracy(model) -> float:
        with torch.inference_mode():
            logits = torch.cat([model(**b).logits for b in evaluation])
        return round(float((logits.argmax(-1) == gold).float().mean()), 4)

    models, figures = (
        {"unpruned": teacher},
        {"test_examples": len(test), "unpruned_accuracy": accuracy(teacher)},
    )
    scores = importance(load_model(folder), scoring)  # one measurement: the scopes differ only in the ranking
    for scope in SCOPES:
        began = time.perf_counter()
        model, report = prune(load_model(folder), scoring, heads=1 / 3, ffn=0.25, scores=scores, scope=scope)
        fit(
            Distiller(model, teacher, temperature=2.0),
            train,
            tokenizer,
            work / f"run-{scope}",
            args.recover_epochs,
        )
        models[scope] = model.eval()
        save_model(model, work / scope, tokenizer)  # (to time again, or to compare in bench/compress.py)
        figures[f"{scope}_accuracy"] = accuracy(model)
        figures[f"{scope}_heads_per_layer"] = report["heads_per_layer"]
        figures[f"{scope}_intermediate_sizes"] = report["intermediate_sizes"]
        print(f"{scope}: heads per layer {report['heads_per_layer']}, feed-forward widths "
              f"{report['intermediate_sizes']}, {report['parameters_after']:,} parameters; pruned and "
              f"recovered ({args.recover_epochs} epochs) in {time.perf_counter() - began:.0f}s: accuracy "
              f"{figures[f'{scope}_accuracy']:.4f} (unpruned {figures['unpruned_accuracy']:.4f}); {work / scope}",
              flush=True)  # fmt: skip
    with torch.inference_mode():
        texts = (test * (BATCH // max(len(test), 1) + 1))[:BATCH]
        inputs = {n: batches(head, tokenizer, texts, n, BATCH)[0] for n in (SHORT, LONG)}
        seconds = {(name, n): float("inf") for name in models for n in inputs}
        for _ in range(2):  # the models in turns, twice: a moment of load hits each alike
            for name, model in models.items():
                for n, batch in inputs.items():
                    s = cpu_seconds(lambda m=model, b=batch: m(**b), args.repeats)
                    seconds[name, n] = min(seconds[name, n], s)
        blocks = {name: block_seconds(model, inputs[LONG], args.repeats) for name, model in models.items()}
    print(f"\nBBC News, all-MiniLM-L6-v2 classifier, a third of the heads and a quarter of the neurons "
          f"removed; {len(test)} test articles; CPU ms per batch of {BATCH}, 1 thread")  # fmt: skip
    print(f"{'model':9s} {'accuracy':>8s} {'params':>7s} {'24 tok':>7s} {'x':>5s} {'128 tok':>8s} {'x':>5s}")
    base = {n: seconds["unpruned", n] for n in inputs}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        speed = {n: base[n] / seconds[name, n] for n in inputs}
        figures[f"{name}_parameters"] = params
        for n in inputs:
            figures[f"{name}_{n}_cpu_ms"] = round(seconds[name, n] * 1e3, 1)
            figures[f"{name}_{n}_speedup"] = round(speed[n], 3)
        print(f"{name:9s} {figures[f'{name}_accuracy']:8.4f} {params / 1e6:6.1f}M "
              f"{seconds[name, SHORT] * 1e3:7.1f} {speed[SHORT]:5.2f} {seconds[name, LONG] * 1e3:8.1f} "
              f"{speed[LONG]:5.2f}")  # fmt: skip
    print(f"\nper block at {LONG} tokens, CPU ms: attention / feed-forward")
    for name, parts in blocks.items():
        print(f"{name:9s} " + "  ".join(f"{a * 1e3:5.1f}/{f * 1e3:5.1f}" for a, f in parts))
        figures[f"{name}_block_ms"] = [[round(a * 1e3, 2), round(f * 1e3, 2)] for a, f in parts]
    emit(figures)


if __name__ == "__main__":
    main()
