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
Which way each linear call runs (oneDNN on packed weights, oneDNN, or torch's F.linear) is chosen
per dtype, shape and row count by what the routes measured on this CPU at first use (the model's
``Calibration``, graft/kernels/calibrate.py). ``report(model)`` says which paths are on, why the
others are not, and which route each linear path takes with the figures that chose it.
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
from graft.kernels.calibrate import ENV, ROWS, Calibration, processor
from graft.kernels.dropout import Dropout
from graft.kernels.feedforward import FastFeedForward
from graft.kernels.linear import FUSED, ONEDNN, ONEDNN_BF16, ROUTES, PackedLinear, plain, weights_signature
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
    loaded model serves many threads; compiled decoding keeps its graphs here too. The
    ``calibration`` chooses each linear call's route (shared with the model's copies: it holds
    facts about the CPU, not the weights).
    """

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration if calibration is not None else Calibration()
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
        return Kernels(self.calibration)  # a copy's weights are new: nothing else to share

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


def optimize(model: nn.Module, calibration: Calibration | None = None) -> nn.Module:
    """Run ``model`` on graft's CPU kernels (in place; returns it). Same numbers to rounding.

    ``calibration``: how each linear call chooses its route (default: measured on this CPU at
    first use, or forced by $GRAFT_KERNEL_ROUTE; graft.kernels.calibrate).
    """
    kernels = kernels_of(model) or Kernels(calibration)
    if calibration is not None:
        kernels.calibration = calibration
    model.kernels = kernels  # a plain attribute, not a submodule or parameter
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
        if type(module) in REFERENCES:
            module.kernels = kernels
    kernels.calibration.expect(linear_shapes(model))
    if log.isEnabledFor(logging.DEBUG):  # (the report times the routes not timed yet)
        for path, state in report(model).items():
            log.debug("kernels: %s: %s", path, state)
    return model


def linear_shapes(model: nn.Module) -> set[tuple[int, int, str]]:
    """(out, in, fused activation) of every linear call ``model`` makes, fused projections included."""
    return layer_shapes(model) | fused_shapes(model)


def layer_shapes(model: nn.Module) -> set[tuple[int, int, str]]:
    """(out, in, activation) of the linear layers: "none", or the GELU/ReLU oneDNN fuses into one."""
    shapes = {(m.out_features, m.in_features, "none") for m in model.modules() if isinstance(m, nn.Linear)}
    for ffn in (m for m in model.modules() if isinstance(m, FeedForward) and m.activation in FUSED):
        first = ffn.up if ffn.gate is None else ffn.gate
        shapes.add((first.out_features, first.in_features, ffn.activation))
    return shapes


def fused_shapes(model: nn.Module) -> set[tuple[int, int, str]]:
    """(out, in, "none") of the concatenated projections: Q/K/V, K/V, gate/up."""
    shapes = set()
    for module in model.modules():
        if isinstance(module, FeedForward) and module.gate is not None:
            gate, up = module.gate, module.up
            shapes.add((gate.out_features + up.out_features, up.in_features, "none"))
        if isinstance(module, Attention):
            q, k, v = module.q, module.k, module.v
            shapes.add((q.out_features + k.out_features + v.out_features, q.in_features, "none"))
            shapes.add((k.out_features + v.out_features, k.in_features, "none"))
    return shapes


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
    """Each kernel path of ``model``: on, or why not; and for an optimized model on CPU, the route
    each linear path takes at each class of row counts, with the timings that chose it (timing
    what this CPU has not timed yet)."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    fast = [m for m in attention if isinstance(m, FastAttention)]
    unfused = [m for m in fast if not (plain(m.q) and plain(m.k) and plain(m.v))]
    weight = next(model.parameters(), None)
    device = weight.device.type if weight is not None else "cpu"
    kernels = kernels_of(model)
    if not ONEDNN:
        linear = "torch's F.linear: oneDNN's matmul is not in this torch build"
    elif device != "cpu":
        linear = f"torch's F.linear on {device}"
    elif kernels is None:
        linear = "torch's F.linear (the reference)"
    elif kernels.calibration.force is not None:
        linear = f"{kernels.calibration.force} wherever a call allows it (forced by {ENV} or the Calibration)"
    else:
        where = kernels.calibration.path() or "kept in memory"
        linear = (
            f"per shape, the fastest of oneDNN on packed weights, oneDNN and F.linear (F.linear unless "
            f"another is 5% faster), timed on {processor()} with {torch.get_num_threads()} threads ({where})"
        )
    states = {
        "linear": linear,
        "attention": f"kernels in {len(fast)} of {len(attention)} layers",
        "fused q/k/v": f"in {len(fast) - len(unfused)} layers"
        + (f"; {len(unfused)} have wrapped or hooked projections (LoRA, adapters)" if unfused else ""),
        "dropout": "graft's masks on CPU" if any(isinstance(m, Dropout) for m in model.modules()) else "none",
    }
    onednn = weight.dtype == torch.float32 and ONEDNN or weight.dtype == torch.bfloat16 and ONEDNN_BF16
    if kernels is not None and device == "cpu" and onednn:
        states.update(routes(model, kernels.calibration, weight.dtype))
    if kernels is not None and device == "cpu":
        states["attention (float32, inference)"] = kernels.calibration.explain_attention(torch.float32)
    return states


def routes(model: nn.Module, calibration: Calibration, dtype: torch.dtype) -> dict[str, str]:
    """The route each linear path of ``model`` takes in ``dtype``, per class of row counts and shape."""
    layers, fused = sorted(layer_shapes(model)), sorted(fused_shapes(model))

    def line(rows: tuple[str, ...], shapes: list[tuple[int, int, str]], candidates: tuple[str, ...]) -> str:
        return "; ".join(
            f"{ROWS[r]} row{'s' * (ROWS[r] > 1)}: "
            + ", ".join(
                f"{o}x{i}{'' if a == 'none' else ' + ' + a} "
                + calibration.explain(dtype, ROWS[r], o, i, a, candidates)
                for o, i, a in shapes
            )
            for r in rows
        )

    name = str(dtype).removeprefix("torch.")
    states = {
        f"frozen linears ({name}: decoding, embedding)": line(("one", "few", "many"), layers, ROUTES),
        f"fused q/k/v and gate/up ({name}, frozen)": line(("one", "few", "many"), fused, ROUTES),
        f"inference linears ({name}; GELU/ReLU fused, SiLU gates on F.linear)": line(
            ("many",), layers, ("onednn", "torch")
        ),
    }
    if dtype == torch.float32:
        plain_layers = [s for s in layers if s[2] == "none"]
        states["training linear (float32)"] = line(("many",), plain_layers, ("onednn", "torch"))
    else:
        states[f"training linear ({name})"] = (
            "F.linear: oneDNN's training linear is for float32 without autocast"
        )
    return states
