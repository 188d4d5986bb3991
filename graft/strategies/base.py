"""The strategy registry (chapters 4, 5): how much of a pretrained model trains, written once for all families.

A strategy is a dataclass of options with ``apply(model)``: it freezes parameters and/or wraps
modules in place and returns the module to train. Strategies are named by strings:

    parse_strategy("freeze:4")              # Freeze(layers=4)
    parse_strategy("lora:r=8,alpha=16")     # LoRA(r=8, alpha=16)
    parse_strategy("lora", {"r": 8})        # the same, from a recipe's strategy.options

Every strategy also takes ``lr_decay`` (layer-wise learning-rate decay) and ``unfreeze``
(gradual unfreezing, one more layer every N epochs), so both combine with any of them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from graft import kernels
from graft.errors import GraftError, coerce, did_you_mean
from graft.nn import EncoderDecoder
from graft.strategies.lr import GradualUnfreezing, layerwise_param_groups
from graft.tasks.base import body_of

log = logging.getLogger("graft")

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the body (task heads), except those tied to body weights."""
    in_body = {id(p) for p in body_of(model).parameters()}
    return [p for p in model.parameters() if id(p) not in in_body]


@dataclass
class ParameterCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return f"{self.trainable:,} of {self.total:,} parameters trainable ({share:.2f}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    params = list(model.parameters())  # tied parameters are listed once
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


@dataclass
class Strategy:
    """Base of every strategy: the options all of them share.

    Subclasses set ``name`` (the registry key), optionally ``positional`` (the option that
    "name:VALUE" sets), and implement ``prepare(model)``: mark trainable parameters of the
    body and add modules. The head always trains.
    """

    name: ClassVar[str] = ""
    positional: ClassVar[str | None] = None
    # False: the strategy works on one stack's embeddings or cache (prompts, prefixes, cached
    # features) and refuses an encoder-decoder (T5, BART) in one line
    encoder_decoders: ClassVar[bool] = True
    towers: ClassVar[bool] = False  # applies to a dual encoder (CLIP's text and image towers) too

    lr_decay: float = 1.0  # layer-wise learning-rate decay: layer l gets lr * lr_decay ** (depth above it)
    unfreeze: int = 0  # gradual unfreezing: head first, then one more layer from the top every N epochs

    def check(self) -> None:
        """Validate option values (GraftError naming the option)."""
        if self.lr_decay <= 0 or self.lr_decay > 1:
            raise GraftError(
                f"strategy {self.name!r}: option 'lr_decay' must be in (0, 1], got {self.lr_decay}"
            )
        if self.unfreeze < 0:
            raise GraftError(f"strategy {self.name!r}: option 'unfreeze' must be >= 0, got {self.unfreeze}")

    def prepare(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze/wrap ``model`` in place; return the module to train (and log what trains)."""
        body = body_of(model)
        if not self.encoder_decoders and isinstance(body, EncoderDecoder):
            usable = ", ".join(name for name, cls in STRATEGIES.items() if cls.encoder_decoders)
            raise GraftError(
                f"strategy {self.name!r} does not apply to an encoder-decoder ({body.config.family}); use {usable}"
            )
        if getattr(body, "towers", None) and not self.towers:
            raise GraftError(
                f"strategy {self.name!r} does not apply to a {body.config.family} model (a text and an image "
                "tower); use full, freeze:tower=text, bitfit or lora"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        trained = self.prepare(model)
        if kernels.enabled(model):  # the strategy's new modules (LoRA's dropout) get their kernels too
            kernels.optimize(model)
        for p in head_parameters(model):
            p.requires_grad_(True)
        trained.strategy = self  # the trainer asks it for param_groups
        if self.unfreeze:
            trained.unfreezing = GradualUnfreezing(trained, self.unfreeze)  # a trainer callback
        log.info("strategy %s: %s", self.spec(), count_parameters(trained))
        return trained

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: layer-wise decayed learning rates, no decay on biases and norms."""
        return layerwise_param_groups(model, lr, self.lr_decay, weight_decay)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The string that parses back to this strategy (options that differ from the defaults)."""
        default = type(self)()
        changed = [f"{k}={format_value(v)}" for k, v in self.options().items() if getattr(default, k) != v]
        return self.name + (":" + ",".join(changed) if changed else "")


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_strategy(spec: str | Strategy, options: dict[str, Any] | None = None) -> Strategy:
    """A strategy from "name", "name:VALUE" or "name:key=value,key=value" (+ a dict of options)."""
    if isinstance(spec, Strategy):
        return spec
    name, _, rest = spec.strip().partition(":")
    if name not in STRATEGIES:
        raise GraftError(
            f"strategy {name!r}: unknown (known: {', '.join(STRATEGIES)}){did_you_mean(name, STRATEGIES)}"
        )
    cls = STRATEGIES[name]
    given: dict[str, Any] = {}
    # split on commas that start a new key=value, so regex values may contain commas
    for i, part in enumerate(p for p in re.split(r",(?=\s*\w+\s*=)", rest) if p.strip()) if rest else []:
        key, eq, value = part.partition("=")
        if not eq:
            if i or cls.positional is None:
                raise GraftError(f"strategy {spec!r}: expected key=value, got {part!r}")
            key, value = cls.positional, part
        given[key.strip()] = value.strip()
    given.update(options or {})
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in given.items():
        if key not in fields:
            raise GraftError(
                f"strategy {name!r}: unknown option {key!r} (options: {', '.join(fields)}){did_you_mean(key, fields)}"
            )
        values[key] = coerce(value, hints[key], f"strategy {name!r}: option {key!r}")
    strategy = cls(**values)
    strategy.check()
    return strategy


def check_positive(strategy: Strategy, *names: str) -> None:
    for n in names:
        if getattr(strategy, n) <= 0:
            raise GraftError(
                f"strategy {strategy.name!r}: option {n!r} must be positive, got {getattr(strategy, n)}"
            )


def apply_strategy(
    model: nn.Module, spec: str | Strategy, options: dict[str, Any] | None = None
) -> nn.Module:
    """Parse ``spec`` and apply it: the module to train."""
    return parse_strategy(spec, options).apply(model)
