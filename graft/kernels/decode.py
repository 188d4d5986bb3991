"""Compiled decoding: each step of a decoder-only model as one torch.compile graph.

The prompt runs eagerly; then each step is ``compiled_step(model)``: ``decode_step``'s closure
over the model, given a fresh code object per model and weights state (torch.compile keys its
graphs to the code; the guards on modules are dropped, so this key is what keeps a graph to its
model), compiled with inductor freezing (the weights become constants, packed for oneDNN) and
cpp_wrapper. The cache then has a fixed size (``StaticKVCache``): ``cache.position`` says where a
step writes, and each step passes a (B, 1, 1, capacity) bool mask of the positions written so
far, which ``Transformer.forward`` uses as given. The capacity is marked dynamic, so one graph per
batch size serves every prompt length.
"""

from __future__ import annotations

import logging
import types
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graft.kernels.attention import StaticKVCache
from graft.kernels.linear import weights_signature
from graft.kernels.switch import Kernels, kernels_of

log = logging.getLogger("graft")

# torch.compile's options for a decoding step: the graph's kernels called from C++ (inductor's
# cpp_wrapper), and no guards on the model's modules at every call (compiled_step keys each
# graph to one model and its weights instead). Freezing (the weights folded into the graph as
# constants, packed once for oneDNN) is set around each call: dynamo reads it before the options apply.
COMPILE_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def decode_step(model: nn.Module) -> Callable[..., torch.Tensor]:
    """One decoding step of ``model`` (a causal-LM TaskModel) over a fixed-size cache, as a function
    of tensors only (the model is its closure, so that compiled, its weights are the graph's constants)."""

    def step(
        tokens: torch.Tensor,  # (B, 1)
        positions: torch.Tensor,  # (B, 1)
        mask: torch.Tensor,  # (B, 1, 1, capacity) bool: the cache positions each row may attend
        cache: StaticKVCache,  # fixed-size: writes at cache.position
    ) -> torch.Tensor:  # (B, V) float32
        out = model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        )
        return out.logits[:, -1].float()

    return step


def compiled_step(model: nn.Module, kernels: Kernels, batch_size: int) -> Callable[..., torch.Tensor]:
    """``decode_step`` compiled with torch.compile for ``model`` as its weights are now; kept on
    the model's Kernels, so a chat's turns compile once (and once more per new batch size).

    The graph holds the weights as constants, so it may serve only this model in this state: each
    model, and each new state of its weights (moved, replaced, updated in place, or its modules'
    training mode), gets its own copy of the step's code, since torch.compile keys compiled graphs
    to the code. The cache's length is a dynamic dimension: one graph serves every prompt length.
    """
    signature = (weights_signature(model), tuple(m.training for m in model.modules()))
    with kernels.lock:
        kept = kernels.compiled
        if kept is None or kept[0] != signature:
            step = decode_step(model)
            # a new code object, for compiled graphs of its own; and a new name, since dynamo carries
            # the shapes it saw over to code of the same file, line and name (a dimension that
            # differed between two models would become dynamic)
            name = f"decode_step_{uuid.uuid4().hex}"
            code = step.__code__.replace(co_name=name, co_qualname=name)
            step = types.FunctionType(code, step.__globals__, name, None, step.__closure__)
            compiled = torch.compile(step, fullgraph=True, options=COMPILE_OPTIONS)

            def run(*args: Any) -> torch.Tensor:
                # frozen: fused projections, one matrix multiply over concatenated weights, folded too
                with torch._inductor.config.patch(freezing=True), kernels.frozen(kernels.folded):
                    return compiled(*args)

            kept = kernels.compiled = (signature, run, set())
        if batch_size not in kept[2]:  # the first step compiles: say why it takes a while
            kept[2].add(batch_size)
            log.info(
                "generation: compiling the decoding step (once per model and batch size; a minute or so)"
            )
    return kept[1]


class CompiledDecoding:
    """The steps of a batch being decoded through ``compiled_step``, over a ``StaticKVCache`` of
    fixed size (prompt + steps) and a boolean mask of the positions written so far."""

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        kernels = kernels_of(model)
        self.model = model
        self.run = compiled_step(model, kernels, batch_size)
        self.visible: torch.Tensor | None = None  # (B, 1, 1, capacity) bool
        self.cache: StaticKVCache | None = None

    def new_cache(self, num_layers: int, capacity: int) -> StaticKVCache:
        self.cache = StaticKVCache(num_layers, capacity=capacity)
        return self.cache

    def start(self, mask: torch.Tensor, length: int) -> None:
        """After the prompt (``length`` positions of the (B, capacity) mask): the cache keeps its size."""
        B, capacity = mask.shape
        self.visible = torch.zeros(B, 1, 1, capacity, dtype=torch.bool, device=mask.device)
        self.visible[:, 0, 0, :length] = mask[:, :length].bool()
        self.cache.position = torch.tensor([length], device=mask.device)
        self.any_length()

    def any_length(self) -> None:
        """Compile the step for any cache size (prompt + steps), not just this one."""
        for buffer in (*self.cache.keys, *self.cache.values):
            torch._dynamo.maybe_mark_dynamic(buffer, 2)  # (B, nkv, capacity, hd)
        torch._dynamo.maybe_mark_dynamic(self.visible, 3)  # (B, 1, 1, capacity)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """(B,) tokens at position ``length - 1`` of the cache -> (B, V) float32 logits."""
        self.cache.position.fill_(length - 1)
        self.visible[:, 0, 0, length - 1] = True
        window = self.model.config.sliding_window
        if window is not None and length > window:  # keys that left the window
            self.visible[:, 0, 0, : length - window] = False
        logits = self.run(tokens[:, None], positions, self.visible, self.cache)
        self.cache.lengths = [length] * len(self.cache.lengths)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search; the cache itself is reordered by the caller)."""
        if self.visible is not None:
            self.visible = self.visible.index_select(0, index)
            self.any_length()
