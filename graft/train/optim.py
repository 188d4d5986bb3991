"""Optimizers (chapter 7): AdamW without weight decay on biases and norms, Adafactor, SGD with momentum."""

from __future__ import annotations

import torch
from torch import nn

from graft.errors import GraftError, did_you_mean
from graft.strategies.lr import no_decay_names
from graft.train.config import OPTIMIZERS, OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, decay and no decay, over trainable parameters in a fixed (named) order."""
    skip = no_decay_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def can_fuse(groups: list[dict]) -> bool:
    """torch's fused kernels (one pass over each tensor) take plain float tensors on CPU or CUDA."""
    params = [p for g in groups for p in g["params"]]
    return all(
        type(p) is nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    strategy = getattr(model, "strategy", None)  # set by graft.strategies.apply_strategy
    if strategy is not None:  # layer-wise learning-rate decay groups (two plain groups without decay)
        groups = strategy.param_groups(model, cfg.lr, cfg.weight_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise GraftError("optim: the model has no trainable parameters")
    # The fused update reads and writes each tensor once, instead of once per elementwise op.
    speed = {"fused": True} if can_fuse(groups) else {"foreach": True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **speed)
    if cfg.name == "adafactor":
        # torch's Adafactor factors the second moment of matrices: O(n + m) memory instead of O(n m).
        return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **speed)
    raise GraftError(
        f"optim.name: unknown optimizer {cfg.name!r} (one of {', '.join(OPTIMIZERS)}){did_you_mean(cfg.name, OPTIMIZERS)}"
    )
