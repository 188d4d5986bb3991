"""Discriminative learning rates and gradual unfreezing (Howard & Ruder, 2018; chapter 5).

Both see the model as a stack of depths: 0 is the embeddings (and prompt-tuning vectors),
1..L the blocks, L + 1 everything above them (final norm, pooler, prefixes, the head).

- Layer-wise learning-rate decay: depth d trains at lr * decay ** (L + 1 - d), so lower,
  more general layers move less.
- Gradual unfreezing: at first only depth L + 1 trains; every ``every`` epochs one more
  depth from the top joins. Gated parameters keep requires_grad (so an optimizer built at the
  start holds them), but their gradient is dropped as soon as it is accumulated, which leaves
  them bitwise unchanged until their depth is opened.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from graft.tasks.base import body_of, stacks


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that weight decay must not shrink: biases, norm weights, 1-d tensors."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = (
            isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
            or "norm" in type(module).__name__.lower()
        )
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or p.ndim < 2:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def parameter_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth (0 embeddings, 1..L blocks, L + 1 the rest)."""
    body = body_of(model)
    towers = getattr(body, "towers", None)  # a dual encoder (CLIP): each tower's depths side by side
    below, count = {}, 0  # stack prefix -> blocks below it (an encoder-decoder's decoder sits on its encoder)
    if towers:
        below = {name + ".": 0 for name in towers}
        top = max(len(stack.layers) for stack in towers.values()) + 1
    else:
        for prefix, stack in stacks(body):
            below[prefix], count = count, count + len(stack.layers)
        top = count + 1
    in_body = "" if model is body else "body."
    depths = {}
    for name, _ in model.named_parameters():
        local = name[len(in_body) :] if name.startswith(in_body) else None
        prefix = next((p for p in below if p and local is not None and local.startswith(p)), "")
        local = local[len(prefix) :] if local is not None else None
        if towers and local is not None and not prefix:  # the projections and logit scale: on top
            local = "projection"
        if local is None:
            depths[name] = top
        elif local.startswith("embed."):  # a prompt too (embed.prompt)
            depths[name] = 0
        elif local.startswith("layers."):
            depths[name] = below[prefix] + int(local.split(".")[1]) + 1
        else:
            depths[name] = top
    return depths


def layerwise_param_groups(
    model: nn.Module, lr: float, decay: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (depth, weight decay or not), each group with its own lr.

    With decay == 1 this is the usual two groups. Biases and norm weights get no weight decay,
    as in graft.train.optim's two groups.
    """
    depths = parameter_depths(model)
    top = max(depths.values(), default=0)
    skip = no_decay_names(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = depths[name] if decay != 1 else top
        key = (depth, name in skip)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * decay ** (top - depth),
                "weight_decay": 0.0 if name in skip else weight_decay,
                "depth": depth,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


class GradualUnfreezing:
    """Opens one more depth from the top every ``every`` epochs.

    Call ``set_epoch``, or ``attach`` a trainer: then the stage is read from the trainer's epoch
    whenever a gradient arrives, so a resumed run opens exactly the depths the original had.
    """

    def __init__(self, model: nn.Module, every: int) -> None:
        self.every, self.stage, self.trainer = every, 0, None
        depths = parameter_depths(model)
        self.top = max(depths.values())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self.gate(depths[name]))

    def is_open(self, depth: int) -> bool:
        if self.trainer is not None:
            self.set_epoch(self.trainer.state.epoch)
        return depth >= self.top - self.stage

    def gate(self, depth: int):
        def drop_gradient(p: nn.Parameter) -> None:
            if not self.is_open(depth):
                p.grad = None

        return drop_gradient

    def set_epoch(self, epoch: int) -> None:
        self.stage = epoch // self.every

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def __call__(self, trainer: Any, out: Any = None) -> None:
        self.set_epoch(trainer.state.epoch)
