"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): small trainable layers in every block.

An adapter maps a sub-layer's output h to h + up(act(down(h))), with ``up`` initialized to
zero so the adapted model starts equal to the pretrained one. Placement:

- houlsby: after the attention and after the feed-forward of every block;
- pfeiffer: after the feed-forward only.

The adapter is a child of the sub-layer it follows (``layers.3.ffn.adapter``) and runs as a
forward hook on it, so the base weights keep their names and the block code stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn.feedforward import activation
from graft.strategies.base import Strategy, body_of, check_positive, register

PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}


class Adapter(nn.Module):
    """h -> h + up(act(down(h))); (B, T, H) -> (B, T, H)."""

    def __init__(self, dim: int, size: int, act: str = "relu") -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.act = activation(act)
        self.up = nn.Linear(size, dim)
        # as adapter-transformers: a small random down projection with zero bias, so about half
        # the bottleneck units are active at the start, and a zero up projection
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def run_adapter(module: nn.Module, args, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook: the sub-layer's output goes through its adapter (attention's output comes
    with its probabilities, which stay as they are)."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def add_adapters(model: nn.Module, size: int, act: str, placement: str) -> list[Adapter]:
    body = body_of(model)
    cfg = body.config
    added = []
    for block in body.layers:
        for where in PLACEMENTS[placement]:
            sub = getattr(block, where)
            p = next(sub.parameters())
            sub.adapter = Adapter(cfg.hidden_size, size, act).to(device=p.device, dtype=p.dtype)
            sub.register_forward_hook(run_adapter)
            added.append(sub.adapter)
    return added


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter out again (the model is the pretrained one afterwards)."""
    for module in body_of(model).modules():
        if isinstance(getattr(module, "adapter", None), Adapter):
            # found by function rather than by handle, so it also works on deep copies
            for key in [k for k, hook in module._forward_hooks.items() if hook is run_adapter]:
                del module._forward_hooks[key]
            del module.adapter


@register
@dataclass
class Adapters(Strategy):
    """Bottleneck adapters in every block; base weights frozen. ``adapter:pfeiffer``, ``adapter:size=16``."""

    name = "adapter"
    positional = "placement"

    placement: str = "houlsby"
    size: int = 64  # bottleneck width
    activation: str = "relu"
    train_norms: bool = False  # also train the blocks' LayerNorms (as Houlsby et al. did)

    def check(self) -> None:
        super().check()
        check_positive(self, "size")
        if self.placement not in PLACEMENTS:
            raise GraftError(
                f"strategy 'adapter': placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}"
            )
        try:
            activation(self.activation)
        except ValueError:
            raise GraftError(
                f"strategy 'adapter': activation {self.activation!r} is not one of gelu, gelu_tanh, relu, silu, quick_gelu"
            ) from None

    def prepare(self, model: nn.Module) -> nn.Module:
        for adapter in add_adapters(model, self.size, self.activation, self.placement):
            adapter.requires_grad_(True)
        if self.train_norms:
            for name, p in body_of(model).named_parameters():
                if name.startswith("layers.") and "norm" in name.split(".")[2]:
                    p.requires_grad_(True)
        return model
