"""TorchScript and torch.export files: the same graphs as ONNX, run by torch alone (no graft).

    torchscript        model.pt   torch.jit.trace of the graph; torch.jit.load(path)(*inputs)
    exported-program   model.pt2  torch.export.export with dynamic batch/sequence axes, saved by
                                  torch.export.save; torch.export.load(path).module()(*inputs)

Both take the inputs positionally, in the manifest's order, and return the outputs in its order
(one tensor for an encoder or a head; logits then the presents for a decoder). A trace keeps the
Python branches and sizes its example took: the parity check on other shapes (graft.export.check)
is what shows that a traced file holds for them too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from graft.errors import GraftError
from graft.export.check import Runner
from graft.export.graph import Graph
from graft.export.onnx import dynamic_shapes, trace_inputs


def failed(what: str, graph: Graph, e: Exception) -> GraftError:
    cause = e.__cause__ or e
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return GraftError(f"export: {what} could not export this {graph.task} model ({reason})")


def export_torchscript(graph: Graph, path: Path) -> None:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values; the parity check decides
        try:
            traced = torch.jit.trace(graph, trace_inputs(graph), check_trace=False)
        except Exception as e:
            raise failed("torch.jit.trace", graph, e) from None
    torch.jit.save(traced, str(path))


def export_program(graph: Graph, path: Path) -> None:
    def dynamic(axes):  # torch.export finds how the named axes relate (mask = past + sequence)
        if isinstance(axes, tuple):
            return tuple(dynamic(a) for a in axes)
        return {axis: torch.export.Dim.DYNAMIC for axis in axes}

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(
                graph, trace_inputs(graph), dynamic_shapes=dynamic(dynamic_shapes(graph))
            )
        except Exception as e:
            raise failed("torch.export", graph, e) from None
    torch.export.save(program, str(path))


def load(fmt: str, path: Path):
    """The callable a file holds: a ScriptModule or an exported program's module."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    return torch.export.load(str(path)).module()


def runner(fmt: str, path: Path, names: list[str]) -> Runner:
    """A function of numpy inputs (by name) -> the file's outputs as numpy arrays."""
    module = load(fmt, path)

    @torch.inference_mode()
    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names))
        return [t.float().numpy() for t in (out if isinstance(out, tuple | list) else (out,))]

    return run
