"""``graft compress``: every variant of a plan, measured the same way, in one table and one plot.

Each step of the plan (graft.compress.plan) makes a model folder under OUT/models/ with graft's own
quantize, distill and prune code; each variant is then

- evaluated on the same test records, through the same predict loop and head metrics as
  ``graft eval`` (accuracy for classification, entity F1 for token classification);
- timed on the same collated inputs, in turns, round by round (so a change in the machine's load
  hits every variant alike): examples/s at batch 32 (the best round) and the median latency of
  single examples at batch 1 (over every round);
- weighed: the bytes of its weight files on disk.

A variant is on the Pareto front when no other is at least as accurate and at least as fast
(batch-1 p50) and better in one of the two. OUT/ gets report.md, report.csv and pareto.png
(metric against latency, point area by bytes on disk, the front joined and ringed), written as a
whole (graft.io.atomic.atomic_folder) or not at all.
"""

from __future__ import annotations

import copy
import csv
import io
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graft.compress.distill import Distiller, keep_layers, train_steps, uniform_map
from graft.compress.plan import Step
from graft.compress.prune import check_prunable, least_important
from graft.compress.quantize import quantize_folder, size_on_disk
from graft.errors import GraftError
from graft.io.atomic import atomic_folder, atomic_path, write_text
from graft.tasks import TaskModel

# the metric each task's row is judged by (higher is better), from its head's evaluate()
METRICS = {"classification": "accuracy", "token-classification": "f1"}
BATCH = 32
IMPORTANCE_BATCHES = 32  # prune scores heads and neurons on this many training batches at most


@dataclass
class Settings:
    """How the variants are trained and timed (graft compress's flags)."""

    steps: int = 200  # training steps of distill and of prune's recovery, unless the step says
    lr: float = 5e-5
    batch_size: int = 16  # training batch
    temperature: float = 2.0
    max_length: int | None = None  # tokens per example, evaluation and timing alike
    texts: int = 256  # examples timed at batch 32 (the test records, repeated as needed)
    latency: int = 50  # single examples timed at batch 1
    rounds: int = 3
    seed: int = 0


@dataclass
class Variant:
    """A row of the report."""

    name: str
    folder: Path  # where its weights lie
    how: str  # how it was made, for the report
    model: Any = None  # a TaskModel or an ExportedModel
    bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    score: float = 0.0  # the task's metric
    p50_ms: float = 0.0  # batch 1
    per_s: float = 0.0  # examples/s at batch 32
    pareto: bool = False


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (score, latency) points no other point dominates (a higher-or-equal score at a
    lower-or-equal latency, strictly better in one); equal points are all on the front."""
    return [
        not any(s >= score and t <= time and (s > score or t < time) for s, t in points)
        for score, time in points
    ]


def check_plan(steps: Sequence[Step], model: TaskModel, train: Sequence[dict] | None) -> None:
    """What would fail half-way through the plan, said before the first variant is built."""
    if model.task not in METRICS:
        raise GraftError(
            f"compress: a {model.task} model; graft compress compares {' and '.join(METRICS)} models"
        )
    trained = [s.text for s in steps if s.trained]
    if trained and not train:
        raise GraftError(
            f"compress: {trained[0]} trains the model; give labelled training data with --train FILE"
        )
    cfg = model.body.config
    for step in steps:
        if step.kind == "distill" and step.options["layers"] > cfg.num_layers:
            raise GraftError(
                f"--plan: distill:layers={step.options['layers']} is more than the model's {cfg.num_layers} layers"
            )
        if step.kind == "prune":
            blocks = model.body.layers
            for what, sizes in (
                ("heads", [b.attn.num_heads for b in blocks]),
                ("ffn", [b.ffn.down.in_features for b in blocks]),
            ):
                fraction = step.options.get(what, 0.0)
                where = f"--plan: prune:{what}={fraction}"
                scope = step.options.get("scope", "global")
                least_important([torch.zeros(n) for n in sizes], fraction, what, where, scope)
            if step.options.get("heads"):
                try:
                    check_prunable(model)
                except GraftError as e:  # graft prune's own hint names its flags, not the plan's keys
                    reason = str(e).removeprefix("prune: ").split(";")[0]
                    raise GraftError(
                        f"--plan: prune:heads={step.options['heads']}: {reason}; prune:ffn=FRACTION alone prunes"
                        " only the feed-forward"
                    ) from None


def shuffled_batches(head: Any, tokenizer: Any, records: Sequence[dict], settings: Settings) -> list[dict]:
    """The training records in a seeded random order, collated ``batch_size`` at a time."""
    order = list(records)
    random.Random(settings.seed).shuffle(order)
    size = settings.batch_size
    return [
        head.collate(order[i : i + size], tokenizer, settings.max_length) for i in range(0, len(order), size)
    ]


def build(
    step: Step,
    source: Path,
    dest: Path,
    tokenizer: Any,
    train: Sequence[dict] | None,
    settings: Settings,
    log: Callable[[str], None],
) -> Variant:
    """Make the model of ``step`` from the float model folder ``source`` into ``dest``."""
    from graft.compress.prune import prune
    from graft.loading import load_model, save_model

    if step.kind == "fp32":
        return Variant(step.text, source, "the model as given")
    if not step.trained:
        quantize_folder(source, dest, step.kind, overwrite=True)
        return Variant(step.text, dest, f"graft quantize --method {step.kind}")
    steps, lr = step.options.get("steps", settings.steps), step.options.get("lr", settings.lr)
    torch.manual_seed(settings.seed)
    teacher = load_model(source)
    batches = shuffled_batches(teacher.head, tokenizer, train or [], settings)
    budget = f"{steps} steps at lr {lr:g}, batch {settings.batch_size}, T={settings.temperature:g}"
    if step.kind == "distill":
        layers = uniform_map(step.options["layers"], teacher.body.config.num_layers)
        model = keep_layers(teacher, layers)
        distiller = Distiller(model, teacher, settings.temperature, layer_map=layers)
        how = f"teacher layers {layers} kept, distilled from the model ({budget})"
    else:
        model = copy.deepcopy(teacher)
        scoring = batches[:IMPORTANCE_BATCHES]
        options = step.options
        scope = options.get("scope", "global")
        model, report = prune(model, scoring, options.get("heads", 0.0), options.get("ffn", 0.0), scope=scope)
        distiller = Distiller(model, teacher, settings.temperature)
        scored = sum(len(b["input_ids"]) for b in scoring)
        how = (
            f"{report['heads_removed']} heads and {report['neurons_removed']} FFN neurons removed"
            f" ({'the same share of each layer' if scope == 'layer' else 'ranked across layers'},"
            f" Michel et al. importance over {scored} training examples), recovered by distillation ({budget})"
        )
    log(f"compress: {step.text}: training {steps} steps")
    train_steps(distiller, batches, steps, lr)
    with atomic_folder(dest) as tmp:
        save_model(model.eval(), tmp, tokenizer)
    return Variant(step.text, dest, how)


def exported(source: Path, dest: Path, tokenizer: Any, int8: bool, test: Sequence[dict]) -> Variant:
    """graft export's ONNX graph of the float model (int8: per-channel weights, checked at export on
    the ``test`` records, as ``graft export --check-data`` checks it: a label head by its argmax
    agreement on real rows, not by its logits' cosine on random-token rows, which can refuse a
    well-trained classifier whose decisions int8 keeps)."""
    from graft.export import export_model
    from graft.export.check import Int8Check, record_cases
    from graft.loading import load_model

    model = load_model(source)
    check = None
    if int8:
        check = Int8Check(data="the --data records", cases=record_cases(model, tokenizer, test, "--data"))
    export_model(model, dest, tokenizer, fmt="onnx", int8=int8, int8_check=check)
    name = "onnx-int8" if int8 else "onnx-fp32"
    return Variant(name, dest, f"graft export --format onnx{' --int8' if int8 else ''}")


def evaluate(
    variant: Variant, tokenizer: Any, records: Sequence[dict], settings: Settings, metric: str
) -> None:
    """graft eval's metrics of the variant on ``records``."""
    from graft.export.backend import predictor

    predictions = [p for _, p in predictor(variant.model)(tokenizer, records, BATCH, settings.max_length)]
    variant.metrics = variant.model.head.evaluate(predictions, list(records))
    variant.score = float(variant.metrics[metric])


def inputs(
    head: Any, tokenizer: Any, records: Sequence[dict], size: int, count: int, max_length: int | None
) -> list[dict]:
    """``count`` examples of ``records`` (repeated as needed), collated ``size`` at a time, labels dropped."""
    chosen = (list(records) * (count // max(len(records), 1) + 1))[:count]
    out = []
    for i in range(0, len(chosen), size):
        batch = head.collate(chosen[i : i + size], tokenizer, max_length)
        out.append({k: v for k, v in batch.items() if k != "labels"})
    return out


def time_variants(variants: Sequence[Variant], batches: list[dict], singles: list[dict], rounds: int) -> None:
    """Examples/s at batch 32 (the best round) and the p50 latency at batch 1 (over all rounds),
    the variants taking turns within each round."""

    def run(model: Any, data: list[dict]) -> float:
        start = time.perf_counter()
        for batch in data:
            model(**batch)
        return time.perf_counter() - start

    examples = sum(len(b["input_ids"]) for b in batches)
    best = {v.name: float("inf") for v in variants}
    single: dict[str, list[float]] = {v.name: [] for v in variants}
    with torch.inference_mode():
        for v in variants:  # warm up on every input: weights are packed and kernel routes timed per shape
            run(v.model, batches + singles)
        for _ in range(rounds):
            for v in variants:
                best[v.name] = min(best[v.name], run(v.model, batches))
                single[v.name] += [run(v.model, [item]) for item in singles]
    for v in variants:
        v.per_s = examples / best[v.name]
        v.p50_ms = statistics.median(single[v.name]) * 1e3


def compress(
    source: Path,
    steps: Sequence[Step],
    out: Path,
    test: Sequence[dict],
    train: Sequence[dict] | None = None,
    onnx: bool = False,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[Variant]:
    """Build, evaluate, time and weigh every variant of ``steps`` (and graft's ONNX exports with
    ``onnx``); write OUT/models/*, report.md, report.csv and pareto.png, OUT as a whole."""
    from graft.export.backend import load_exported
    from graft.loading import load_model, load_processor

    settings = settings or Settings()
    tokenizer = load_processor(source)
    model = load_model(source)
    if not isinstance(model, TaskModel):
        raise GraftError(
            f"{source}: a bare {model.config.family} model; graft compress needs a fine-tuned task model"
        )
    check_plan(steps, model, train)
    metric = METRICS[model.task]
    with atomic_folder(out) as tmp:
        variants = [build(s, source, tmp / "models" / s.slug, tokenizer, train, settings, log) for s in steps]
        if onnx:
            variants += [
                exported(source, tmp / "models" / f"onnx-{k}", tokenizer, k == "int8", test)
                for k in ("fp32", "int8")
            ]
        for v in variants:
            v.bytes = size_on_disk(v.folder)
            v.model = load_exported(v.folder) if v.name.startswith("onnx-") else load_model(v.folder).eval()
            log(f"compress: {v.name}: evaluating on {len(test)} examples")
            evaluate(v, tokenizer, test, settings, metric)
        head = model.head
        batches = inputs(head, tokenizer, test, BATCH, settings.texts, settings.max_length)
        singles = inputs(head, tokenizer, test, 1, settings.latency, settings.max_length)
        log(f"compress: timing {len(variants)} variants, {settings.rounds} rounds")
        time_variants(variants, batches, singles, settings.rounds)
        for v, front in zip(variants, pareto([(v.score, v.p50_ms) for v in variants]), strict=True):
            v.pareto = front
        reference = variants[0]
        write_text(tmp / "report.csv", table_csv(variants, metric))
        write_text(tmp / "report.md", report_md(variants, reference, metric, source, len(test), settings))
        pareto_png(variants, tmp / "pareto.png", metric, f"{source.name}: {metric} against latency")
    for v in variants:  # the folders now lie under OUT
        if v.folder.is_relative_to(tmp):
            v.folder = out / v.folder.relative_to(tmp)
    return variants


COLUMNS = ("variant", "metric", "score", "p50_ms_batch1", "examples_per_s_batch32", "bytes", "pareto", "how")


def table_csv(variants: Sequence[Variant], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for v in variants:
        writer.writerow(
            [
                v.name,
                metric,
                f"{v.score:.6g}",
                f"{v.p50_ms:.4g}",
                f"{v.per_s:.4g}",
                v.bytes,
                int(v.pareto),
                v.how,
            ]
        )
    return buffer.getvalue()


def report_md(
    variants: Sequence[Variant], reference: Variant, metric: str, source: Path, examples: int, s: Settings
) -> str:
    """The Markdown table, each ratio against the plan's first row."""
    lines = [
        f"# graft compress: {source}",
        "",
        f"{metric} on {examples} test examples; latency: the median of {s.latency} single examples at batch 1"
        f" over {s.rounds} rounds; throughput: {s.texts} examples at batch {BATCH}, the best of {s.rounds}"
        f" rounds; the variants take turns in each round; torch threads: {torch.get_num_threads()}."
        f" Ratios are against {reference.name}. * = on the Pareto front ({metric} against batch-1 latency).",
        "",
        f"| variant | {metric} | change | p50 ms (batch 1) | speed-up | examples/s (batch 32) | speed-up"
        " | MiB on disk | size | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for v in variants:
        lines.append(
            f"| {v.name} | {v.score:.4f} | {v.score - reference.score:+.4f} | {v.p50_ms:.2f}"
            f" | {reference.p50_ms / v.p50_ms:.2f}x | {v.per_s:.1f} | {v.per_s / reference.per_s:.2f}x"
            f" | {v.bytes / 2**20:.2f} | {v.bytes / max(reference.bytes, 1):.2f}x | {'*' if v.pareto else ''} |"
        )
    lines += ["", "How each variant was made:", ""]
    lines += [
        f"- {v.name}: {v.how} ({v.folder if v.name == 'fp32' else 'models/' + v.folder.name})"
        for v in variants
    ]
    return "\n".join(lines) + "\n"


def pareto_png(variants: Sequence[Variant], path: Path, metric: str, title: str) -> Path:
    """The metric against batch-1 latency; point area by bytes on disk; the front joined and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(v.bytes for v in variants) or 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        ax.scatter(
            v.p50_ms, v.score, s=40 + 560 * v.bytes / largest, alpha=0.6,
            edgecolors="crimson" if v.pareto else "grey", linewidths=2.0 if v.pareto else 0.8,
        )  # fmt: skip
        ax.annotate(v.name, (v.p50_ms, v.score), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = sorted((v.p50_ms, v.score) for v in variants if v.pareto)
    ax.plot([x for x, _ in front], [y for _, y in front], color="crimson", linewidth=1, label="Pareto front")
    times = [v.p50_ms for v in variants]
    if min(times) > 0 and max(times) / min(times) > 20:  # an ONNX graph next to torch: keep both readable
        ax.set_xscale("log")
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{title} (area: bytes on disk)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
