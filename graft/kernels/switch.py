"""The one switch between graft's reference model and its CPU kernels.

``optimize(model)`` turns a model's modules into their kernel-backed twins, in place: each
``Attention``, ``FeedForward``, ``nn.Dropout`` and ``nn.Linear`` keeps its parameters, buffers,
hooks and state-dict names and gets the twin's ``forward`` (the module's class becomes the twin,
a subclass that adds no state), and the model gets one ``Kernels`` object that the twins share.
``reference(model)`` turns them back. Both are idempotent; ``optimize`` on an optimized model
also covers modules added since (a strategy's wrappers).

A twin declares what it supports and otherwise runs the reference's code for that call: a
wrapped or hooked linear layer is called as a module, attention probabilities come from the
written-out math, torch.compile, autocast, other devices and dtypes get torch's own kernels.
``report(model)`` says which paths are on and why the others are not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from graft.kernels.attention import FastAttention
from graft.kernels.dropout import Dropout
from graft.kernels.feedforward import FastFeedForward
from graft.kernels.linear import ONEDNN, PackedLinear, plain, weights_signature
from graft.nn.attention import Attention
from graft.nn.feedforward import FeedForward

log = logging.getLogger("graft")

# reference class -> its kernel-backed twin (a subclass with no state of its own)
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    Attention: FastAttention,
    FeedForward: FastFeedForward,
    nn.Dropout: Dropout,
    nn.Linear: PackedLinear,
}
REFERENCES = {twin: ref for ref, twin in TWINS.items()}

PACK_LIMIT = 2 * 2**30  # bytes of weights up to which frozen weights are kept packed (a second copy)


class Kernels:
    """The kernels' state for one model, shared by its twins and by every thread calling it.

    The packed weights (oneDNN's blocked layout, made once) are kept here while the model's
    weights stay the same, and whether a call runs with frozen weights is per thread, so one
    loaded model serves many threads; compiled decoding keeps its graphs here too.
    """

    def __init__(self) -> None:
        self.local = threading.local()  # .packed: this thread's store while inside frozen()
        self.lock = threading.Lock()
        self.kept: tuple[tuple, dict[object, torch.Tensor]] | None = None  # (weights signature, store)
        self.folded: dict[object, torch.Tensor] = {}  # the store a compiled step runs with (stays empty)
        self.compiled: Any = None  # graft.kernels.decode's compiled steps for these weights
        self.over_limit = False

    def packed(self) -> dict[object, torch.Tensor] | None:
        """This thread's store of packed weights while its weights are frozen, else None."""
        return getattr(self.local, "packed", None)

    def store(self, model: nn.Module) -> dict[object, torch.Tensor] | None:
        """The model's store of packed weights, kept between calls (a chat's turns, say) and
        emptied when any weight changed (moved, replaced or updated in place) since; None (with
        a line in the log, once) for a model whose weights take more than PACK_LIMIT bytes."""
        if sum(p.numel() * p.element_size() for p in model.parameters()) > PACK_LIMIT:
            if not self.over_limit:
                self.over_limit = True
                log.info("kernels: weights over %d GiB are not kept packed (a second copy)", PACK_LIMIT >> 30)
            return None
        signature = weights_signature(model)
        with self.lock:
            if self.kept is None or self.kept[0] != signature:
                self.kept = (signature, {})
            return self.kept[1]

    @contextlib.contextmanager
    def frozen(self, store: dict[object, torch.Tensor] | None = None) -> Iterator[None]:
        """Inside, on this thread, the weights do not change: each is packed into oneDNN's
        layout once, at its first use (4-9% faster matrix multiplies when they stay in cache,
        up to 2x when they stream from memory, as in decoding), and Q/K/V and gate/up run as
        one matrix multiply each. ``store``: where to keep the packs (``store(model)``); a new
        one, dropped at the end, by default."""
        previous = self.packed()
        self.local.packed = store if store is not None else {}
        try:
            yield
        finally:
            self.local.packed = previous

    def __deepcopy__(self, memo: dict) -> Kernels:
        return Kernels()  # a copy's weights are new: nothing to share

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def kernels_of(model: nn.Module) -> Kernels | None:
    """The Kernels of an optimized model (or of any part of one), else None."""
    for module in model.modules():
        kernels = module.__dict__.get("kernels")
        if isinstance(kernels, Kernels):
            return kernels
    return None


def optimize(model: nn.Module) -> nn.Module:
    """Run ``model`` on graft's CPU kernels (in place; returns it). Same numbers to rounding."""
    kernels = kernels_of(model) or Kernels()
    model.kernels = kernels  # a plain attribute, not a submodule or parameter
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
        if type(module) in REFERENCES:
            module.kernels = kernels
    for path, state in report(model).items():
        log.debug("kernels: %s: %s", path, state)
    return model


def reference(model: nn.Module) -> nn.Module:
    """Run ``model`` as graft.nn's plain reference code again (in place; returns it)."""
    for module in model.modules():
        ref = REFERENCES.get(type(module))
        if ref is not None:
            module.__class__ = ref
        module.__dict__.pop("kernels", None)
    return model


def enabled(model: nn.Module) -> bool:
    return kernels_of(model) is not None


@contextlib.contextmanager
def frozen(model: nn.Module, store: dict[object, torch.Tensor] | None = None) -> Iterator[None]:
    """``Kernels.frozen`` for an optimized model; nothing for a reference one."""
    kernels = kernels_of(model)
    with kernels.frozen(store) if kernels is not None else contextlib.nullcontext():
        yield


def report(model: nn.Module) -> dict[str, str]:
    """Each kernel path of ``model``: on, or why not."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    fast = [m for m in attention if isinstance(m, FastAttention)]
    unfused = [m for m in fast if not (plain(m.q) and plain(m.k) and plain(m.v))]
    weight = next(model.parameters(), None)
    device = weight.device.type if weight is not None else "cpu"
    linear = (
        "torch's F.linear: oneDNN's matmul is not in this torch build"
        if not ONEDNN
        else f"torch's F.linear on {device}"
        if device != "cpu"
        else "oneDNN"
    )
    states = {
        "linear": linear,
        "attention": f"kernels in {len(fast)} of {len(attention)} layers",
        "fused q/k/v": f"in {len(fast) - len(unfused)} layers"
        + (f"; {len(unfused)} have wrapped or hooked projections (LoRA, adapters)" if unfused else ""),
        "dropout": "graft's masks on CPU" if any(isinstance(m, Dropout) for m in model.modules()) else "none",
    }
    return states
