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
from graft.export.graph import Float32Interface, Graph
from graft.export.onnx import dynamic_shapes, trace_inputs


def failed(what: str, graph: Graph, e: Exception) -> GraftError:
    cause = e.__cause__ or e
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return GraftError(f"export: {what} could not export this {graph.task} model ({reason})")


def traced_module(graph: Graph) -> torch.nn.Module:
    """What the file holds: the graph, or a bfloat16 graph behind its float32 interface."""
    return graph if next(graph.parameters()).dtype == torch.float32 else Float32Interface(graph)


def flat(axes: tuple) -> list[dict[int, str]]:
    """Per-input axes in input order (a graph's *past come as one nested tuple)."""
    return [a for item in axes for a in (flat(item) if isinstance(item, tuple) else [item])]


def export_torchscript(graph: Graph, path: Path) -> None:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values; the parity check decides
        try:
            traced = torch.jit.trace(traced_module(graph), trace_inputs(graph), check_trace=False)
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
            module, axes = traced_module(graph), dynamic_shapes(graph)
            if module is not graph:  # forward(*inputs): one tuple for them all
                axes = (tuple(flat(axes)),)
            program = torch.export.export(module, trace_inputs(graph), dynamic_shapes=dynamic(axes))
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
