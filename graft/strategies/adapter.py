"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): small trainable layers in every block.

An adapter maps a sub-layer's output h to h + up(act(down(h))), with ``up`` initialized to
zero so the adapted model starts equal to the pretrained one. Placement:

- houlsby: after the attention and after the feed-forward of every block;
- pfeiffer: after the feed-forward only.

The sub-layer is replaced by a wrapper, ``Adapted``, that keeps it (``layers.3.ffn.base``) and
runs its adapter (``layers.3.ffn.adapter``) on its output: printing a block shows what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn.feedforward import activation
from graft.strategies.base import Strategy, check_positive, register
from graft.tasks.base import body_of, stacks

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


class Adapted(nn.Module):
    """A sub-layer (kept as ``base``) followed by its adapter: adapter(base(x)).

    Attention's output comes with its probabilities (None unless asked for), which stay as they are.
    """

    def __init__(self, base: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # attention: (output, probabilities)
            return self.adapter(out[0]), out[1]
        return self.adapter(out)  # (B, T, H)


def blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of the body (both stacks of an encoder-decoder)."""
    return [block for _, stack in stacks(body_of(model)) for block in stack.layers]


def sub_width(block: nn.Module) -> int:
    return block.ffn_norm.weight.shape[0]  # the block's hidden size


def add_adapters(model: nn.Module, size: int, act: str, placement: str) -> list[Adapter]:
    added = []
    for block in blocks(model):
        for where in PLACEMENTS[placement]:
            sub = getattr(block, where)
            p = next(sub.parameters())
            adapter = Adapter(sub_width(block), size, act).to(device=p.device, dtype=p.dtype)
            setattr(block, where, Adapted(sub, adapter))
            added.append(adapter)
    return added


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter out again (the model is the pretrained one afterwards)."""
    for block in blocks(model):
        for where in ("attn", "ffn"):
            sub = getattr(block, where)
            if isinstance(sub, Adapted):
                setattr(block, where, sub.base)


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
            for block in blocks(model):
                for name, p in block.named_parameters():
                    if "norm" in name.split(".")[0]:
                        p.requires_grad_(True)
        return model
