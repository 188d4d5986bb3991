"""Learning-rate schedules (chapter 7): linear warm-up, then linear, cosine, constant or step decay."""

from __future__ import annotations

import math

import torch

from graft.train.config import ScheduleSection


def warmup_steps(cfg: ScheduleSection, total: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)


def lr_factor(cfg: ScheduleSection, step: int, total: int) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``."""
    warm = warmup_steps(cfg, total)
    if step < warm:
        return step / warm  # as transformers does: 0 at the first step, 1 when warm-up ends
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step - warm) // cfg.step_size)
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = cfg.min_lr_ratio
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))  # cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total))
