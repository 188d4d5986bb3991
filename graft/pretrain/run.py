"""The pretraining loop: a model, a stream of masked or packed batches, an optimizer, an HF folder out.

With checkpoint.every, a checkpoint is written every so many steps to train.output/checkpoints (the
weights, the optimizer and schedule, every RNG state, the masking generators' states and where the
stream stands), and ``--resume`` continues from the newest one exactly: the same batches, masks
and losses as a run never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, check_output, write_json
from graft.io.hf import resolve
from graft.loading import load_processor
from graft.pretrain.objectives import build_objective
from graft.pretrain.stream import check_files, forever
from graft.tasks.collate import to_device
from graft.train import checkpoint as ckpt
from graft.train.config import Recipe
from graft.train.loop import recipe_changes
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
    "checkpoint": {"every", "keep"},
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


CHECKPOINTS = "checkpoints"  # train.output/checkpoints/step-00000100/
# what a resumed run may change; every other recipe key decides the batches, the model or the schedule
RESUMABLE = ("train.max_steps", "train.log_every", "train.device", "train.output", "checkpoint.")


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (--resume), or None; an error, before any work, when train.output
    holds an earlier run that neither --resume nor --overwrite says what to do with."""
    if resume and overwrite:
        raise GraftError("--resume continues the run in train.output and --overwrite replaces it: pass one")
    if not resume:
        if not overwrite and any(why is None for _, _, why in ckpt.scan(out / CHECKPOINTS)):
            raise GraftError(
                f"{out}: holds checkpoints of an earlier run; pass --resume to continue it,"
                " --overwrite to start afresh, or set train.output to a new folder"
            )
        check_output(out, "train.output", folder=True, overwrite=overwrite)
        return None
    if out.exists() and not out.is_dir():
        raise GraftError(f"{out}: is a file; train.output takes a folder (a new or an existing one)")
    found = [path for _, path, why in ckpt.scan(out / CHECKPOINTS) if why is None]
    if not found:
        raise GraftError(
            f"{out}: --resume found no complete checkpoint to continue from"
            " (checkpoint.every=N writes one every N steps); run without --resume to start afresh"
        )
    return found[-1]


def check_resume(path: Path, saved: dict[str, Any], recipe: Recipe) -> None:
    """A resumed run trains what the saved one trained, on the same stream: refuse any other change."""
    changes = [c for c in recipe_changes(saved["recipe"], recipe.to_dict()) if not c[0].startswith(RESUMABLE)]
    if changes:
        shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
        raise GraftError(
            f"{path}: --resume continues a run with the recipe it started with, and these differ: {shown};"
            " change them back, or start a new run (another train.output, or --overwrite)"
        )


def run_pretrain(
    recipe: Recipe, source: str = "recipe", overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Train ``model.path`` for train.max_steps optimizer steps on pretrain.files; save it to train.output.

    ``resume``: continue from the newest checkpoint in train.output/checkpoints. Returns the run's
    summary (steps, tokens in the loss, the mean loss of the last log_every steps).
    """
    p, t, c = recipe.pretrain, recipe.train, recipe.checkpoint
    check_unused(recipe, source)
    if not recipe.model.path:
        raise GraftError(f"{source}: model.path: not set (a HF folder or Hub id)")
    if t.max_steps <= 0:
        raise GraftError(
            f"{source}: train.max_steps: must be > 0 for pretraining (a stream has no length), e.g. train.max_steps=1000"
        )
    files = check_files(p.files)
    out = Path(t.output)
    path = check_run_folder(out, resume, overwrite)
    saved = ckpt.read_file(path / "trainer.pt") if path else None
    if saved is not None:
        check_resume(path, saved, recipe)
    torch.manual_seed(t.seed)
    tokenizer = load_processor(recipe.model.path)
    objective = build_objective(resolve(recipe.model.path), recipe, tokenizer, source)
    model = objective.model
    device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    model.to(device).train()
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, t.max_steps)
    first, tokens, recent, start = 1, 0, [], (0, 0)
    if saved is not None:
        ckpt.load_checkpoint(path, model, optimizer)  # weights, optimizer, this process's RNG states
        scheduler.load_state_dict(saved["scheduler"])
        for name, generator in objective.generators().items():
            generator.set_state(saved["generators"][name])
        first, tokens, recent = saved["step"] + 1, saved["tokens"], list(saved["recent"])
        start = tuple(saved["position"])
        log.info("%s: resuming after step %d", path, saved["step"])
    elif overwrite and (out / CHECKPOINTS).exists():  # an earlier run's checkpoints would mix with ours
        ckpt.remove(out / CHECKPOINTS)
    batches = objective.batches(forever(files, skip=start[0]), start)
    for step in range(first, t.max_steps + 1):
        loss_sum = 0.0
        for _ in range(t.accumulate):
            batch = to_device(next(batches), device)
            loss, count = objective.loss(batch)
            (loss / t.accumulate).backward()
            loss_sum += loss.item() / t.accumulate
            tokens += count
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
        if c.every and c.keep and (step % c.every == 0 or step == t.max_steps):
            state = {
                "step": step,
                "tokens": tokens,
                "recent": recent,
                "position": list(batches.position),
                "generators": {name: g.get_state() for name, g in objective.generators().items()},
                "scheduler": scheduler.state_dict(),
                "seed": t.seed,
                "recipe": recipe.to_dict(),
            }
            ckpt.save_checkpoint(out / CHECKPOINTS, step, model, optimizer, state, c.keep)
    summary = {
        "objective": p.objective,
        "steps": t.max_steps,
        "tokens": tokens,
        "loss": sum(recent) / len(recent),
    }
    model.eval()
    with atomic_folder(out) as folder:
        objective.save(folder, tokenizer)
        write_json(folder / "pretrain.json", {**summary, "recipe": json.loads(json.dumps(recipe.to_dict()))})
        if (out / CHECKPOINTS).is_dir():  # hard links: the checkpoints stay where they are until the swap
            shutil.copytree(out / CHECKPOINTS, folder / CHECKPOINTS, copy_function=os.link)
    return summary
