"""Probing (chapter 6): what each layer's representations make linearly readable.

A linear probe (multinomial logistic regression, L-BFGS on standardized features) is trained on
each layer's vectors (the embeddings, then every block's output), mean-pooled per text or taken
at the first piece of each word (``per_token``), and scored on held-out rows. The control task
(Hewitt & Liang 2019) gives each word type (per token) or each distinct text (per text) a
random label drawn with the property's own frequencies: a probe that scores well there is
memorizing, so *selectivity* = accuracy - control accuracy is what a layer really encodes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError


def read_probe_data(
    path: Path, prop: str, text_column: str | None, per_token: bool
) -> tuple[list[Any], list[Any]]:
    """(inputs, labels): texts and one label each, or word lists and one label per word."""
    from graft.data import load_records

    key = "tags" if per_token else "label"
    columns = {prop: key}
    if text_column is not None:
        columns[text_column] = "tokens" if per_token else "text"
    records = list(
        load_records(path, columns=columns, required=("tokens", key) if per_token else ("text", key))
    )
    if not records:
        raise GraftError(f"{path}: no records")
    inputs = [r["tokens"] if per_token else r["text"] for r in records]
    labels = [list(map(str, r["tags"])) if per_token else str(r["label"]) for r in records]
    if len({lab for row in labels for lab in (row if per_token else [row])}) < 2:
        raise GraftError(f"{path}, column '{prop}': a probe needs at least two different values")
    return inputs, labels


@torch.no_grad()
def layer_features(
    body: torch.nn.Module,
    tokenizer: Any,
    inputs: list[Any],
    per_token: bool,
    max_length: int | None,
    batch: int = 16,
) -> tuple[list[torch.Tensor], list[int]]:
    """([L + 1] x (N, H) features, unit -> row): per text, or per word (first piece) with its text's index."""
    from graft.tasks.collate import model_inputs

    layers: list[list[torch.Tensor]] | None = None
    owner: list[int] = []
    device = next(body.parameters()).device
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        enc = tokenizer.encode(chunk, max_length=max_length, is_split_into_words=per_token)
        out = body(
            **{k: v.to(device) for k, v in model_inputs(enc, body.config).items()}, output_hidden_states=True
        )
        mask = enc.attention_mask.to(device).unsqueeze(-1).float()  # (B, T, 1)
        if per_token:  # the first piece of each word (words cut off by max_length are dropped)
            rows, cols = [], []
            for b, words in enumerate(enc.word_ids):
                seen = set()
                for t, w in enumerate(words):
                    if w is not None and w not in seen and enc.sequence_ids[b][t] == 0:
                        seen.add(w)
                        rows.append(b)
                        cols.append(t)
                owner += [start + b] * len(seen)
            picked = [h[rows, cols].float().cpu() for h in out.hidden_states]  # (words, H) each
        else:
            picked = [((h * mask).sum(1) / mask.sum(1)).float().cpu() for h in out.hidden_states]  # (B, H)
            owner += list(range(start, start + len(chunk)))
        if layers is None:
            layers = [[] for _ in picked]
        for store, x in zip(layers, picked, strict=True):
            store.append(x)
    return [torch.cat(xs) for xs in layers], owner


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, classes: int, seed: int, weight_decay: float = 1e-3
) -> torch.nn.Linear:
    """A logistic-regression probe on standardized features (the scaling folded into the layer)."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():  # fold the standardization in: probe(x) directly
        probe.bias -= (probe.weight * (mean / std)).sum(1)
        probe.weight /= std
    return probe


def control_labels(inputs: list[Any], labels: list[Any], per_token: bool, seed: int) -> list[Any]:
    """Random labels per word type (per token) or per distinct text, with the property's frequencies."""
    rng = random.Random(seed)
    pool = [lab for row in labels for lab in row] if per_token else list(labels)
    table: dict[str, str] = {}

    def of(unit: str) -> str:
        if unit not in table:
            table[unit] = rng.choice(pool)
        return table[unit]

    if per_token:
        return [[of(w.lower()) for w in words] for words in inputs]
    return [of(text) for text in inputs]


def probe_layers(
    body: torch.nn.Module,
    tokenizer: Any,
    inputs: list[Any],
    labels: list[Any],
    per_token: bool = False,
    test_fraction: float = 0.25,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Accuracy of a linear probe on every layer, the control task's, and their difference."""
    if per_token:
        for i, (words, tags) in enumerate(zip(inputs, labels, strict=True)):
            if len(words) != len(tags):
                raise GraftError(f"probe: row {i + 1} has {len(words)} words but {len(tags)} labels")
    features, owner = layer_features(body, tokenizer, inputs, per_token, max_length)
    control = control_labels(inputs, labels, per_token, seed)
    flat = lambda rows: [lab for row in rows for lab in row] if per_token else list(rows)  # noqa: E731
    # words dropped by truncation: keep the labels of the words that have features
    kept_y, kept_c = [], []
    counts: dict[int, int] = {}
    for o in owner:
        counts[o] = counts.get(o, 0) + 1
    for i in range(len(inputs)):
        n = counts.get(i, 0)
        kept_y += labels[i][:n] if per_token else [labels[i]] * n
        kept_c += control[i][:n] if per_token else [control[i]] * n
    names = sorted(set(flat(labels)) | set(flat(control)))
    y = torch.tensor([names.index(v) for v in kept_y])
    c = torch.tensor([names.index(v) for v in kept_c])
    # held-out rows are whole texts, so one text's words never sit on both sides
    order = list(range(len(inputs)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(test_fraction * len(inputs)))])
    test = torch.tensor([o in held for o in owner])
    if bool(test.all()) or not bool(test.any()):
        raise GraftError(
            f"probe: {len(inputs)} rows are too few to hold {test_fraction:.0%} out; give more data"
        )
    majority = max(int((y[test] == k).sum()) for k in range(len(names))) / int(test.sum())
    layers = []
    for i, x in enumerate(features):
        scores = {}
        for name, target in (("accuracy", y), ("control", c)):
            p = fit_probe(x[~test], target[~test], len(names), seed)
            with torch.no_grad():
                scores[name] = float((p(x[test]).argmax(-1) == target[test]).float().mean())
        layers.append({"layer": i, **scores, "selectivity": scores["accuracy"] - scores["control"]})
    best = max(layers, key=lambda r: r["accuracy"])
    return {
        "mode": "per_token" if per_token else "mean_pooled",
        "train": int((~test).sum()),
        "test": int(test.sum()),
        "labels": sorted(set(flat(labels))),
        "majority": majority,
        "best_layer": best["layer"],
        "layers": layers,
    }


def plot(result: dict[str, Any], path: Path, title: str = "probe") -> None:
    """Accuracy and control accuracy per layer (layer 0: the embeddings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graft.io.atomic import atomic_path

    layers = [r["layer"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, [r["accuracy"] for r in result["layers"]], marker="o", label="probe")
    ax.plot(layers, [r["control"] for r in result["layers"]], marker="s", label="control task")
    ax.axhline(result["majority"], color="grey", linestyle=":", label="majority class")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
