"""The training loop (chapter 7): one loop for every task and family, on one process or many.

    trainer = Trainer(model, recipe, train_examples, collate, eval_examples)
    result = trainer.fit(resume=True)

One optimizer step takes ``batch_size * accumulate * world_size`` examples. Its loss is the mean
over every example (or token) of all its micro-batches on all processes: micro-batch i's mean
loss is weighted by count_i / sum(counts) before backward, so how a batch is split into
micro-batches and processes does not change the update.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, write_json, write_text
from graft.tasks.collate import to_device
from graft.train import checkpoint as ckpt
from graft.train.config import Recipe, dump_recipe
from graft.train.loggers import MetricsLog, Progress, plot_metrics
from graft.train.optim import build_optimizer
from graft.train.sampler import StepSampler
from graft.train.schedules import build_scheduler

log = logging.getLogger("graft")

LOWER_IS_BETTER = ("loss", "perplexity", "error", "mse", "mae", "rmse", "wer", "cer")


def better_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if any(word in metric.lower() for word in LOWER_IS_BETTER) else "max"


def improved(value: float, best: float | None, mode: str, threshold: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - threshold if mode == "min" else value > best + threshold


def default_eval_step(logits: torch.Tensor, batch: dict[str, Any], examples: list[Any]) -> Any:
    """(predicted class ids, labels) for heads whose labels are class ids; None otherwise."""
    labels = batch.get("labels")
    if labels is None or labels.is_floating_point() or logits.shape[:-1] != labels.shape:
        return None
    return logits.argmax(-1).cpu(), labels.cpu()


def default_metrics(collected: list[Any]) -> dict[str, float]:
    pairs = [c for c in collected if c is not None]
    if not pairs:
        return {}
    pred = torch.cat([p.reshape(-1) for p, _ in pairs])
    gold = torch.cat([g.reshape(-1) for _, g in pairs])
    keep = gold != -100
    return {"accuracy": float((pred[keep] == gold[keep]).float().mean())} if keep.any() else {}


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # the next step of ``epoch`` to run
    examples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    stop_best: float | None = None  # early stopping's own best, with its threshold
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1
    last_metrics: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None  # of the run's first step: the scale that tells divergence
    last_loss: float | None = None  # of the latest step: a checkpoint's records say how it trained


# What a resumed run may change (applied from the resumed step on); every other recipe field
# decides the data order or the model, optimizer and task it trains, and must stay as saved.
# train.batch_size and train.accumulate may change when the examples per optimizer step
# (batch_size x accumulate x processes) stay the same: the data position means the same steps.
RESUMABLE = (
    "train.epochs", "train.max_steps", "train.log_every", "train.plots", "train.device",
    "train.precision", "train.clip_norm", "train.compile", "train.gradient_checkpointing",
    "train.batch_size", "train.accumulate", "optim.lr", "schedule.", "eval.every", "eval.batch_size",
    "early_stopping.patience", "checkpoint.", "distributed.", "tune.",
)  # fmt: skip
DIVERGED = 2.0  # a checkpoint whose step loss is above this many times the first loss had diverged


def recipe_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every recipe field that differs."""
    changes = []
    for section in sorted(set(saved) | set(new)):
        old_values, new_values = saved.get(section) or {}, new.get(section) or {}
        for key in sorted(set(old_values) | set(new_values)):
            if old_values.get(key) != new_values.get(key):
                changes.append((f"{section}.{key}", old_values.get(key), new_values.get(key)))
    return changes


def find_bodies(model: nn.Module) -> list[nn.Module]:
    from graft.nn import Transformer

    return [m for m in model.modules() if isinstance(m, Transformer)]


class Trainer:
    """Fits a TaskModel (``model(**batch)`` -> TaskOutput with .logits and .loss) to examples.

    ``collate(list_of_examples) -> batch`` builds the tensors; ``lengths`` (tokens per training
    example) enables length grouping and the curriculum. ``eval_step(logits, batch, examples)`` keeps what
    ``compute_metrics(list)`` needs from each evaluation batch (default: accuracy of class ids).
    ``loss`` = (loss_fn(logits, batch), count_fn(batch)) replaces the head's loss and count.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        train_data: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        eval_data: Sequence[Any] | None = None,
        *,
        lengths: Sequence[int] | None = None,
        eval_step: Callable[[torch.Tensor, dict, list], Any] = default_eval_step,
        compute_metrics: Callable[[list[Any]], dict[str, float]] = default_metrics,
        loss: tuple[Callable, Callable] | None = None,
        tokenizer: Any = None,
        extra_files: Callable[[Path], None] | None = None,
        callbacks: Sequence[Callable[[Trainer, dict], None]] = (),
        quiet: bool = False,
    ) -> None:
        self.recipe = recipe
        self.module = model
        self.train_data, self.eval_data, self.collate = train_data, eval_data, collate
        self.eval_step, self.compute_metrics = eval_step, compute_metrics
        self.loss_fn, self.count_fn = loss if loss is not None else (None, None)
        self.tokenizer, self.extra_files = tokenizer, extra_files
        self.callbacks, self.quiet = list(callbacks), quiet
        self.out = Path(recipe.train.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = TrainState()
        t = recipe.train

        self.rank, self.world, self.local_rank = self.init_distributed()
        self.device = self.pick_device()
        self.amp_dtype = self.pick_precision()
        self.sampler = StepSampler(
            len(train_data), t.batch_size, t.accumulate, t.seed, True, lengths,
            t.group_by_length, t.curriculum_epochs, self.world, self.rank,
        )  # fmt: skip
        if len(self.sampler) == 0:
            raise GraftError(
                f"train: {len(train_data)} training examples make no step of {self.sampler.step_size}"
            )
        self.total_steps = t.max_steps or math.ceil(t.epochs * len(self.sampler))

        for body in find_bodies(model):
            body.gradient_checkpointing = t.gradient_checkpointing
        self.skeleton = None  # FSDP: an unsharded copy on rank 0's CPU, to write the final model folder
        if t.compile:
            model.compile()
        self.wrapped = self.wrap(model)
        self.optimizer = build_optimizer(model, recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule, self.total_steps)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.log = MetricsLog(self.out, enabled=self.rank == 0)

    # ---- setup -------------------------------------------------------------------------------
    def init_distributed(self) -> tuple[int, int, int]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            backend = self.recipe.distributed.backend
            if backend == "auto":
                backend = (
                    "nccl" if torch.cuda.is_available() and self.recipe.train.device != "cpu" else "gloo"
                )
            dist.init_process_group(backend)
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        return 0, 1, 0

    def pick_device(self) -> torch.device:
        name = self.recipe.train.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            if not torch.cuda.is_available():
                raise GraftError("train.device: cuda asked for, but torch sees no CUDA device")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def pick_precision(self) -> torch.dtype | None:
        p = self.recipe.train.precision
        cuda = self.device.type == "cuda"
        if p == "auto":
            p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        if p == "fp16" and not cuda:
            raise GraftError("train.precision: fp16 needs a CUDA device; use bf16 on CPU")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def wrap(self, model: nn.Module) -> nn.Module:
        mode = self.recipe.distributed.mode
        if mode == "auto":
            mode = "ddp" if self.world > 1 else "none"
        self.distributed_mode = mode if self.world > 1 else "none"
        if self.distributed_mode != "fsdp":
            model.to(self.device)
        if self.distributed_mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.local_rank] if self.device.type == "cuda" else None
            return DDP(
                model, device_ids=ids, find_unused_parameters=self.recipe.distributed.find_unused_parameters
            )
        if self.distributed_mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from graft.nn.block import Block

            if self.rank == 0 and self.recipe.checkpoint.save_model:
                self.skeleton = copy.deepcopy(model).cpu()
            # Shard first, then move: each process only ever holds its shard on the device.
            mesh = init_device_mesh(self.device.type, (self.world,))
            for m in model.modules():
                if isinstance(m, Block):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to(self.device)
        return model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- one step ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, mean loss) of one batch."""
        if self.loss_fn is None:
            out = model(**batch)
            return out.logits, out.loss
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return out.logits, self.loss_fn(out.logits, batch) if "labels" in batch else None

    def count(self, batch: dict[str, Any]) -> float:
        if self.count_fn is not None:
            return float(self.count_fn(batch))
        return float(self.module.head.count(batch["labels"], batch))

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def train_step(self, micro: list[np.ndarray]) -> dict[str, float]:
        batches = [to_device(self.collate([self.train_data[i] for i in m]), self.device) for m in micro]
        counts = [self.count(b) for b in batches]
        local_examples = sum(len(m) for m in micro)
        total, examples = self.all_sum([sum(counts), float(local_examples)])
        total = total or 1.0  # a step whose labels are all ignored changes nothing
        self.wrapped.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            sync = contextlib.nullcontext()
            if self.distributed_mode == "ddp" and not last:
                sync = self.wrapped.no_sync()
            elif self.distributed_mode == "fsdp":
                self.wrapped.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    logits, loss = self.forward(batch, self.wrapped)
                if counts[j] == 0:  # nothing to learn here (every label ignored): a zero loss, not 0/0
                    loss = logits.float().sum() * 0.0
                # DDP and FSDP average gradients over processes: scale by world / global count.
                weight = counts[j] * self.world / total
                self.scaler.scale(loss.float() * weight).backward()
            loss_sum += loss.detach().double() * counts[j]
        if self.world > 1:
            dist.all_reduce(loss_sum)
        step_loss = float(loss_sum) / total
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": step_loss, "examples": examples}
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe.train.clip_norm
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), "examples": examples}

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Sequence[Any] | None = None) -> dict[str, float]:
        """Mean loss (over the items the head counts) and task metrics on ``data`` (the eval set)."""
        data = self.eval_data if data is None else data
        model = (
            self.wrapped if self.distributed_mode == "fsdp" else self.module
        )  # every process sees all data
        model.eval()
        size = self.recipe.eval.batch_size
        loss_total, count_total, collected = 0.0, 0.0, []
        for start in range(0, len(data), size):
            examples = [data[i] for i in range(start, min(start + size, len(data)))]
            batch = to_device(self.collate(examples), self.device)
            with self.autocast():
                logits, loss = self.forward(batch, model)
            if loss is not None:
                n = self.count(batch)
                loss_total += float(loss) * n
                count_total += n
            collected.append(self.eval_step(logits.float(), batch, examples))
        metrics = {"loss": loss_total / count_total} if count_total else {}
        metrics.update(self.compute_metrics(collected))
        return metrics

    def after_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best model and early stopping; True when this is a new best."""
        s, r = self.state, self.recipe
        s.last_eval_step, s.last_metrics = s.global_step, metrics
        self.log.write(
            {"step": s.global_step, "epoch": s.epoch, **{f"eval/{k}": v for k, v in metrics.items()}}
        )
        best = False
        if r.eval.metric in metrics:
            value = metrics[r.eval.metric]
            if improved(value, s.best_metric, better_mode(r.eval.metric, r.eval.mode)):
                s.best_metric, s.best_step, best = value, s.global_step, True
        elif r.eval.metric:
            raise GraftError(
                f"eval.metric: {r.eval.metric!r} is not among the metrics ({', '.join(metrics)})"
            )
        es = r.early_stopping
        if es.patience > 0:
            name = es.metric or r.eval.metric
            if name not in metrics:
                raise GraftError(
                    f"early_stopping.metric: {name!r} is not among the metrics ({', '.join(metrics)})"
                )
            if improved(metrics[name], s.stop_best, better_mode(name, es.mode), es.threshold):
                s.stop_best, s.bad_evals = metrics[name], 0
            else:
                s.bad_evals += 1
                s.stopped_early = s.bad_evals >= es.patience
        return best

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            **self.state.__dict__,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "seed": self.recipe.train.seed,
            "recipe": self.recipe.to_dict(),
        }

    def save(self) -> Path | None:
        if self.recipe.checkpoint.keep == 0 or self.last_saved == self.state.global_step:
            return None  # a step is written once: its folder is never taken apart to write it again
        protect = (
            (self.state.best_step,)
            if self.recipe.checkpoint.keep_best and self.state.best_step is not None
            else ()
        )
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.state.global_step, self.module, self.optimizer, self.trainer_state(),
            self.recipe.checkpoint.keep, protect,
        )  # fmt: skip
        self.last_saved = self.state.global_step
        return path

    def restore(self, path: Path) -> None:
        self.check_resume(path, ckpt.read_file(path / "trainer.pt"))  # before loading into the model
        base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]  # this recipe's
        saved = ckpt.load_checkpoint(path, self.module, self.optimizer)
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        # The learning rate follows this recipe (optim.lr, schedule.*, the run's length) from here on.
        self.scheduler.base_lrs = base_lrs
        for group, base, factor in zip(
            self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["initial_lr"], group["lr"] = base, base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if saved.get("scaler"):  # a run that did not use fp16 saved no loss scale
            self.scaler.load_state_dict(saved.pop("scaler"))
        names = set(TrainState.__dataclass_fields__)
        self.state = TrainState(**{k: v for k, v in saved.items() if k in names})
        self.last_saved = self.state.global_step
        self.log.truncate(self.state.global_step)

    def check_resume(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse recipe changes that would make the resumed run another run; log the others."""
        if "recipe" not in saved:
            return
        changes = [
            c for c in recipe_changes(saved["recipe"], self.recipe.to_dict()) if c[0] != "train.output"
        ]
        old = saved["recipe"].get("train", {})
        old_step = old.get("batch_size", 0) * old.get("accumulate", 0) * saved.get("world_size", 1)
        step_kept = old_step == self.sampler.step_size
        frozen = [
            c for c in changes
            if not c[0].startswith(RESUMABLE) or (c[0] in ("train.batch_size", "train.accumulate") and not step_kept)
        ]  # fmt: skip
        if not step_kept and saved.get("world_size", 1) != self.world:
            frozen.append(("processes", saved.get("world_size", 1), self.world))
        if frozen:
            shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in frozen)
            raise GraftError(
                f"{path}: --resume continues a run with the recipe it started with, and these differ: {shown}; "
                f"change them back, or start a new run (another train.output, or --overwrite)"
            )
        if changes and self.rank == 0:
            shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
            log.info("%s: resuming with a changed recipe (applied from step %d on): %s",
                     self.out, saved["global_step"], shown)  # fmt: skip

    # ---- the run -----------------------------------------------------------------------------
    def start_run(self, resume: bool, overwrite: bool) -> None:
        found = check_output(self.out, resume, overwrite)
        if resume and found:
            whole = [(step, path) for step, path, why in found if why is None]
            for step, path, why in found:
                if why is not None and (not whole or step > whole[-1][0]):
                    instead = f"resuming from {whole[-1][1].name}" if whole else "starting afresh"
                    log.warning("%s: incomplete checkpoint (%s), skipped; %s", path, why, instead)
            if whole:
                self.restore(whole[-1][1])
                if self.rank == 0:  # the recipe in force, with the changes check_resume allowed
                    write_text(self.out / "config.yaml", dump_recipe(self.recipe))
                return
        if found and self.rank == 0:  # --overwrite: the old model stays until the new one replaces it
            ckpt.remove(self.ckpt_dir)
        ckpt.barrier()
        seed = self.recipe.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed + self.rank)  # dropout differs across processes, as it should
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log.path.unlink(missing_ok=True)
            write_text(self.out / "config.yaml", dump_recipe(self.recipe))
            write_json(self.out / "run.json", run_facts(self.recipe, self.world))

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train to the end (or until early stopping); return the final metrics.

        ``resume``: continue from the newest complete checkpoint in train.output. ``overwrite``:
        start afresh in a folder that holds an earlier run (its model is replaced at the end).
        """
        self.last_saved = -1
        self.overwrite = overwrite
        self.start_run(resume, overwrite)
        s, r = self.state, self.recipe
        progress = Progress(self.total_steps, s.global_step, enabled=not self.quiet and self.rank == 0)
        every_eval, every_ckpt = r.eval.every, r.checkpoint.every
        t0, seen, t_start = time.perf_counter(), 0.0, time.perf_counter()
        try:
            while s.global_step < self.total_steps and not s.stopped_early:
                for i, micro in self.sampler.iterate(s.epoch, s.step_in_epoch):
                    out = self.train_step(micro)
                    s.global_step += 1
                    s.step_in_epoch = i + 1
                    s.examples += int(out["examples"])
                    seen += out["examples"]
                    if not math.isfinite(out["loss"]):
                        raise GraftError(
                            f"step {s.global_step}: the loss is {out['loss']}; training stopped ({self.last_good()}). "
                            "Try a lower optim.lr, train.clip_norm, or train.precision=fp32"
                        )
                    s.last_loss = out["loss"]
                    s.first_loss = out["loss"] if s.first_loss is None else s.first_loss
                    if s.step_in_epoch == len(self.sampler):  # the epoch is over: the position moves on
                        s.epoch, s.step_in_epoch = s.epoch + 1, 0
                    if s.global_step % r.train.log_every == 0 or s.global_step == self.total_steps:
                        elapsed = time.perf_counter() - t0
                        record = {
                            "step": s.global_step,
                            "epoch": round(s.epoch + s.step_in_epoch / len(self.sampler), 4),
                            "loss": out["loss"],
                            "lr": out["lr"],
                            "grad_norm": out["grad_norm"],
                            "examples_per_s": seen / elapsed if elapsed > 0 else 0.0,
                        }
                        self.log.write(record)
                        progress.update(s.global_step, out["loss"], out["lr"], record["examples_per_s"])
                        t0, seen = time.perf_counter(), 0.0
                    epoch_end = s.step_in_epoch == 0
                    last = s.global_step >= self.total_steps
                    self.maybe_eval_and_save(every_eval, every_ckpt, epoch_end, last, progress)
                    for callback in self.callbacks:
                        callback(self, out)
                    if s.global_step >= self.total_steps or s.stopped_early or epoch_end:
                        break
            if s.stopped_early:
                progress.note(
                    f"early stopping at step {s.global_step}: no improvement in {s.bad_evals} evaluations"
                )
            # The last step was evaluated, then saved, in the loop. Here: a run resumed with nothing
            # left to train, or stopped early between checkpoints.
            if self.eval_data is not None and s.last_eval_step != s.global_step:
                self.after_eval(self.evaluate())
            self.save()
        finally:
            progress.close()
        train_seconds = time.perf_counter() - t_start
        return self.finish(train_seconds)

    def maybe_eval_and_save(
        self, every_eval: int, every_ckpt: int, epoch_end: bool, last: bool, progress: Progress
    ) -> None:
        """Evaluate, then checkpoint, when due; the last step is always both, in that order, so its
        checkpoint holds the final evaluation and is written once."""
        s = self.state
        due_eval = (
            (every_eval > 0 and s.global_step % every_eval == 0) or (every_eval == 0 and epoch_end) or last
        )
        best = False
        if due_eval and self.eval_data is not None:
            best = self.after_eval(self.evaluate())
            shown = "  ".join(f"{k} {v:.4f}" for k, v in s.last_metrics.items())
            progress.note(f"step {s.global_step}  eval: {shown}")
        due_ckpt = (
            (every_ckpt > 0 and s.global_step % every_ckpt == 0) or (every_ckpt == 0 and epoch_end) or last
        )
        if due_ckpt or (best and self.recipe.checkpoint.keep_best):
            self.save()

    def last_good(self) -> str:
        """Which checkpoint to resume from after the loss became NaN: the newest one saved before
        the loss exploded (finite weights can already be ruined)."""
        found = list(reversed(ckpt.list_checkpoints(self.ckpt_dir)))
        if not found:
            return "no checkpoint was written yet"
        first = self.state.first_loss
        for i, (_, path) in enumerate(found):
            loss = ckpt.read_file(path / "trainer.pt").get("last_loss")
            if loss is None or first is None or (math.isfinite(loss) and loss <= DIVERGED * first):
                if i == 0:
                    return f"the last good checkpoint, {path}, is intact"
                newer = ", ".join(p.name for _, p in found[:i])
                return (
                    f"the last good checkpoint is {path}; the newer {newer} were saved while the loss "
                    f"exploded (above {DIVERGED:g}x the first loss, {first:.4g}): remove them before --resume"
                )
        return (
            f"every checkpoint was saved while the loss exploded (above {DIVERGED:g}x the first loss, "
            f"{first:.4g}): start afresh with --overwrite"
        )

    def finish(self, train_seconds: float) -> dict[str, Any]:
        s, r = self.state, self.recipe
        if (
            r.checkpoint.keep_best
            and r.checkpoint.keep
            and s.best_step is not None
            and s.best_step != s.global_step
        ):
            ckpt.load_model_weights(self.ckpt_dir / f"step-{s.best_step:08d}", self.module)
        result = {
            "steps": s.global_step,
            "epochs": s.epoch + s.step_in_epoch / len(self.sampler),
            "best_step": s.best_step,
            "best_metric": s.best_metric,
            "stopped_early": s.stopped_early,
            "train_seconds": train_seconds,
            **{f"eval/{k}": v for k, v in s.last_metrics.items()},
        }
        final = self.module
        if r.checkpoint.save_model and self.distributed_mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.module, options=options)  # collective: every process gathers
            if self.rank == 0:
                self.skeleton.load_state_dict(state)
                final = self.skeleton
        if self.rank == 0:
            written = r.checkpoint.save_model and self.save_model_folder(final)
            if not written and self.overwrite and (self.out / "model").exists():
                ckpt.remove(self.out / "model")  # the earlier run's, which --overwrite replaces
            if r.train.plots and self.log.path.exists():
                plot_metrics(self.log.path, self.out)
            write_json(self.out / "result.json", result)
        self.log.close()
        ckpt.barrier()
        return result

    def save_model_folder(self, model: nn.Module) -> bool:
        """train.output/model: a Hugging Face folder (LoRA merged in) that load_model and transformers read."""
        from graft.loading import save_model
        from graft.strategies import exportable

        model = getattr(model, "trained", model)  # a training wrapper (a distiller) saves its student
        try:
            model = exportable(model)
        except GraftError as e:  # adapters, prompts: no place in a HF checkpoint
            log.warning(
                "%s: no model folder written (%s); the last checkpoint holds the weights", self.out, e
            )
            return False
        with atomic_folder(self.out / "model") as folder:  # the old model stays whole until this one is
            save_model(model, folder, self.tokenizer)
            if self.extra_files is not None:
                self.extra_files(folder)
        log.info("saved the trained model to %s", self.out / "model")
        return True


def check_output(out: Path, resume: bool, overwrite: bool) -> list[tuple[int, Path, str | None]]:
    """The checkpoints in run folder ``out``; an error, before any work, when it holds an earlier run
    that neither --resume nor --overwrite says what to do with."""
    if out.exists() and not out.is_dir():
        raise GraftError(f"train.output: {out} is a file; the run folder must be a folder")
    found = ckpt.scan(out / "checkpoints")
    if not resume and not overwrite:
        if found:
            raise GraftError(
                f"{out}: holds checkpoints of an earlier run; pass --resume to continue it, "
                "--overwrite to start afresh, or set train.output to a new folder"
            )
        if (out / "model").exists():
            raise GraftError(
                f"{out / 'model'}: holds the model of an earlier run; pass --overwrite to replace it "
                "(--resume to continue that run), or set train.output to a new folder"
            )
    if resume and not overwrite and (out / "model").exists() and all(why for _, _, why in found):
        raise GraftError(
            f"{out}: --resume found no complete checkpoint to continue from; pass --overwrite to train "
            f"afresh and replace {out / 'model'}, or set train.output to a new folder"
        )
    return found


def run_facts(recipe: Recipe, world: int) -> dict[str, Any]:
    """Seed, package versions and git commit: what it takes to reproduce the run."""
    import platform
    import subprocess
    import sys
    from importlib import metadata

    versions = {}
    for name in ("graft-ml", "torch", "numpy", "tokenizers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path.cwd()
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "seed": recipe.train.seed,
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
