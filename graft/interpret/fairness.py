"""Counterfactual bias probes (chapter 9): change only the group word and watch the prediction.

Each template ("The {} worked as a nurse.") is filled with each group word ("he", "she"); the
model's output is compared across the filled sentences. For a classifier: each label's
probability (sigmoid for multi-label, the value for regression) per group, its shift (largest
minus smallest over the groups) and whether the predicted label flips. For a causal LM: the
log-likelihood of each whole sentence (how much more probable one group's sentence is). The
summary averages over templates.

Group gaps over a labelled data set are ``graft eval --groups COLUMN`` (``group_metrics``).
"""

from __future__ import annotations

from typing import Any

import torch

from graft.errors import GraftError, did_you_mean
from graft.tasks import TaskModel


def parse_groups(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",")]
    if len(words) < 2 or not all(words):
        raise GraftError(f"--groups {value!r}: give two or more comma-separated group words, e.g. he,she")
    if len(set(words)) < len(words):
        raise GraftError(f"--groups {value!r}: a group word is given twice")
    return words


def fill(template: str, word: str) -> str:
    if "{}" not in template:
        raise GraftError(f"--template {template!r}: no {{}} where the group word goes")
    return template.replace("{}", word)


@torch.no_grad()
def outputs(model: TaskModel, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(N, C) label scores of a classifier, or (N,) sentence log-likelihoods of a causal LM."""
    from graft.tasks.collate import to_device

    device = next(model.parameters()).device
    if model.task == "causal-lm":
        batch = model.head.collate([{"text": t} for t in texts], tokenizer)
        logits = model(**to_device(batch, device)).logits.float()  # (N, T, V)
        labels = batch["labels"][:, 1:].to(device)  # (N, T - 1)
        logp = logits[:, :-1].log_softmax(-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T - 1)
        return (picked * (labels >= 0)).sum(1).cpu()
    batch = model.head.collate([{"text": t} for t in texts], tokenizer)
    logits = model(**to_device(batch, device)).logits.float()  # (N, C)
    kind = model.head.problem_type
    if kind == "regression":
        return logits.cpu()
    return (logits.sigmoid() if kind == "multi_label" else logits.softmax(-1)).cpu()


def counterfactuals(
    model: TaskModel, tokenizer: Any, templates: list[str], groups: list[str], target: str | None = None
) -> dict[str, Any]:
    """Per template: each group's outputs and the shift between groups; then the mean over templates."""
    if not isinstance(model, TaskModel) or model.task not in ("classification", "causal-lm"):
        task = getattr(model, "task", "base")
        raise GraftError(f"fairness: the {task} task is not supported (classification, causal-lm)")
    if not templates:
        raise GraftError("fairness: give at least one --template")
    names = model.head.id2label if model.task == "classification" else ["log_likelihood"]
    if target is not None and target not in names:
        raise GraftError(
            f"fairness: --target {target!r} is not one of {', '.join(names)}{did_you_mean(target, names)}"
        )
    shown = [target] if target is not None else names
    rows = []
    for template in templates:
        texts = [fill(template, g) for g in groups]
        values = outputs(model, tokenizer, texts)  # (G, C) or (G,)
        values = values if values.dim() == 2 else values[:, None]
        per_group = {
            g: {name: float(values[i, names.index(name)]) for name in shown} for i, g in enumerate(groups)
        }
        shift = {
            name: float(values[:, names.index(name)].max() - values[:, names.index(name)].min())
            for name in shown
        }
        row: dict[str, Any] = {"template": template, "texts": texts, "groups": per_group, "shift": shift}
        if model.task == "classification" and model.head.problem_type == "single_label":
            predicted = {g: names[int(values[i].argmax())] for i, g in enumerate(groups)}
            row["predicted"] = predicted
            row["flipped"] = len(set(predicted.values())) > 1
        rows.append(row)
    summary: dict[str, Any] = {
        "mean_shift": {name: sum(r["shift"][name] for r in rows) / len(rows) for name in shown},
        "max_shift": {name: max(r["shift"][name] for r in rows) for name in shown},
    }
    if "flipped" in rows[0]:
        summary["flip_rate"] = sum(r["flipped"] for r in rows) / len(rows)
    return {"task": model.task, "groups": groups, "templates": rows, "summary": summary}


def group_metrics(
    head: Any, predictions: list[dict[str, Any]], records: list[dict[str, Any]], groups: list[str]
) -> dict[str, Any]:
    """Every metric of the head per group, and for each number the largest gap between groups."""
    per: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups)):
        index = [i for i, x in enumerate(groups) if x == g]
        metrics = head.evaluate([predictions[i] for i in index], [records[i] for i in index])
        metrics["examples"] = len(index)
        per[g] = metrics
    gaps = {}
    for key, value in next(iter(per.values())).items():
        if key == "examples" or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        values = {g: m[key] for g, m in per.items() if isinstance(m.get(key), int | float)}
        hi, lo = max(values, key=values.get), min(values, key=values.get)
        gaps[key] = {"gap": values[hi] - values[lo], "highest": hi, "lowest": lo}
    return {"per_group": per, "gaps": gaps}
