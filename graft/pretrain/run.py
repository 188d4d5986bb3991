"""The pretraining loop: a model, a stream of masked or packed batches, an optimizer, an HF folder out."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import torch

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, check_output, write_json
from graft.io.hf import resolve
from graft.loading import load_config, load_model, load_processor, save_model
from graft.models import FAMILIES
from graft.pretrain.stream import check_files, clm_batches, forever, mlm_batches
from graft.tasks.collate import to_device
from graft.train.config import Recipe
from graft.train.optim import build_optimizer
from graft.train.schedules import build_scheduler

log = logging.getLogger("graft")

# the recipe keys graft pretrain reads (None: the whole section); any other key set is refused
READ: dict[str, set[str] | None] = {
    "model": None,
    "optim": None,
    "schedule": None,
    "pretrain": None,
    "data": {"max_length"},
    "train": {"output", "max_steps", "batch_size", "accumulate", "clip_norm", "seed", "log_every", "device"},
}


def check_unused(recipe: Recipe, source: str) -> None:
    """A key graft pretrain would not read is an error, not a silent no-op."""
    read = ", ".join(f"{s}.{k}" for s, keys in READ.items() if keys for k in sorted(keys))
    for section in dataclasses.fields(recipe):
        keys = READ.get(section.name, set())
        if keys is None:
            continue
        value, default = getattr(recipe, section.name), type(getattr(recipe, section.name))()
        for f in dataclasses.fields(value):
            if f.name not in keys and getattr(value, f.name) != getattr(default, f.name):
                raise GraftError(
                    f"{source}: {section.name}.{f.name}: not used by graft pretrain (it reads model, optim,"
                    f" schedule, pretrain and {read})"
                )


def run_pretrain(recipe: Recipe, source: str = "recipe", overwrite: bool = False) -> dict[str, Any]:
    """Train ``model.path`` for train.max_steps optimizer steps on pretrain.files; save it to train.output.

    Returns the run's summary (steps, tokens in the loss, the mean loss of the last log_every steps).
    """
    p, t = recipe.pretrain, recipe.train
    check_unused(recipe, source)
    if not recipe.model.path:
        raise GraftError(f"{source}: model.path: not set (a HF folder or Hub id)")
    if t.max_steps <= 0:
        raise GraftError(
            f"{source}: train.max_steps: must be > 0 for pretraining (a stream has no length), e.g. train.max_steps=1000"
        )
    files = check_files(p.files)
    out = check_output(t.output, "train.output", folder=True, overwrite=overwrite)
    torch.manual_seed(t.seed)
    task = "masked-lm" if p.objective == "mlm" else "causal-lm"
    options = {"mask_probability": p.mask_probability, "whole_word": p.whole_word, "seed": t.seed}
    family, cfg = load_config(resolve(recipe.model.path))  # the objective checked before the weights load
    if task == "masked-lm" and task not in family.architectures:
        with_mlm = ", ".join(sorted(n for n, f in FAMILIES.items() if task in f.architectures))
        raise GraftError(
            f"{source}: pretrain.objective: mlm needs a masked-LM family ({with_mlm});"
            f" a {family.name} model trains with clm"
        )
    if task == "causal-lm" and not cfg.causal:
        raise GraftError(
            f"{source}: pretrain.objective: clm needs a decoder; a {family.name} model trains with mlm"
        )
    model = load_model(
        recipe.model.path,
        task=task,
        dtype=getattr(torch, recipe.model.dtype),
        kernels=recipe.model.kernels,
        to_train=True,
        **(options if task == "masked-lm" else {}),
    )
    tokenizer = load_processor(recipe.model.path)
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    model.to(device).train()
    texts = forever(files)
    if task == "masked-lm":
        batches = mlm_batches(texts, model.head, tokenizer, t.batch_size, recipe.data.max_length)
    else:
        batches = clm_batches(texts, model.config, tokenizer, t.batch_size, recipe.data.max_length, p.pack)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, t.max_steps)
    tokens, recent = 0, []
    for step in range(1, t.max_steps + 1):
        loss_sum = 0.0
        for _ in range(t.accumulate):
            batch = to_device(next(batches), device)
            loss = model(**batch).loss
            (loss / t.accumulate).backward()
            loss_sum += loss.item() / t.accumulate
            tokens += model.head.count(batch["labels"], batch)
        if not math.isfinite(loss_sum):
            raise GraftError(f"pretrain: the loss is {loss_sum} at step {step} (try a lower optim.lr)")
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-(t.log_every - 1) :], loss_sum] if t.log_every > 1 else [loss_sum]
        if step % t.log_every == 0:
            log.info("step %d: loss %.4f", step, sum(recent) / len(recent))
    summary = {
        "objective": p.objective,
        "steps": t.max_steps,
        "tokens": tokens,
        "loss": sum(recent) / len(recent),
    }
    model.eval()
    with atomic_folder(out) as folder:
        save_model(model, folder, tokenizer)
        write_json(folder / "pretrain.json", {**summary, "recipe": json.loads(json.dumps(recipe.to_dict()))})
    return summary
