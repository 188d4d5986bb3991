"""ONNX through torch.onnx's dynamo exporter, run and checked with ONNX Runtime.

Why the dynamo exporter (torch.onnx.export(dynamo=True)): with torch 2.13 the TorchScript-based
exporter (dynamo=False) stops at ``aten::rms_norm`` (every Llama-family model) and would keep
whatever branch its one traced example took; the dynamo exporter writes every family's graph,
checks dynamic axes symbolically (a misspelled or inconsistent axis is an error, not a silent
fix) and matched graft within 1e-7 on the tiny models of the tests.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from graft.errors import GraftError
from graft.export.check import Runner
from graft.export.graph import (
    DecoderGraph,
    EncoderGraph,
    Graph,
    ImageGraph,
    Seq2SeqDecoderGraph,
    SimilarityGraph,
    TowerGraph,
    example_inputs,
)

log = logging.getLogger("graft")

MIN_OPSET = 18  # the oldest opset the dynamo exporter writes
DEFAULT_OPSET = 18


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise GraftError(
            f"--opset {opset}: too old; torch.onnx's exporter writes opset {MIN_OPSET} to {newest}"
        )
    if opset > newest:
        raise GraftError(f"--opset {opset}: newer than this onnx package knows ({newest})")


def dynamic_shapes(graph: Graph) -> tuple[dict[int, str], ...]:
    """Axis names per input: batch and sequence everywhere; a decoder's mask spans past + sequence;
    an encoder-decoder's cross keys and values span the source."""
    if isinstance(graph, Seq2SeqDecoderGraph):  # forward(*inputs): one tuple for them all
        axes = {
            "decoder_input_ids": {0: "batch", 1: "sequence"},
            "encoder_attention_mask": {0: "batch", 1: "source"},
            "past_key_values": {0: "batch", 2: "past_sequence"},
            "cross": {0: "batch", 2: "source"},
        }
        return (tuple(axes[name.split(".")[0]] for name in graph.input_names()),)
    if isinstance(graph, SimilarityGraph):  # N images against M texts
        texts = {0: "texts", 1: "sequence"}
        return (({0: "images"}, texts, texts),)
    if isinstance(graph, TowerGraph):
        tokens = {0: "batch", 1: "sequence"}
        return ((tokens, tokens) if graph.tower == "text" else ({0: "batch"},),)
    if isinstance(graph, EncoderGraph):
        if graph.audio:
            return (({0: "batch"},),)  # whole windows of the config's frames
        return (({0: "batch", 1: "source"}, {0: "batch", 1: "source"}),)
    if isinstance(graph, DecoderGraph):
        past = {0: "batch", 2: "past_sequence"}
        tokens = {0: "batch", 1: "sequence"}
        return (tokens, {0: "batch", 1: "total_sequence"}, tokens, (past,) * (2 * graph.layers))
    if isinstance(graph, ImageGraph):
        return ({0: "batch"},)  # the image size is the config's
    return tuple({0: "batch", 1: "sequence"} for _ in graph.input_names())


def trace_inputs(graph: Graph) -> tuple[torch.Tensor, ...]:
    """The traced example, positionally: TRACE_SHAPE (a decoder with 3 past positions)."""
    from graft.export.check import TRACE_SHAPE

    batch, length = TRACE_SHAPE
    past = 3 if isinstance(graph, DecoderGraph | Seq2SeqDecoderGraph) else 0
    inputs = example_inputs(graph, batch, length, past=past)
    # clones: a view (position_ids is a slice) would make torch.export guard on its base tensor
    return tuple(inputs[name].clone() for name in graph.input_names())


def output_names(graph: Graph) -> list[str]:
    from graft.export.graph import OUTPUTS

    return graph.output_names() if hasattr(graph, "output_names") else [OUTPUTS[graph.task]]


def export_onnx(graph: Graph, path: Path, opset: int) -> None:
    """Write ``graph`` to ``path`` (weights inside the file, or next to it past 2 GB)."""
    args = trace_inputs(graph)
    outputs = output_names(graph)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names; errors still raise
        try:
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                input_names=graph.input_names(),
                output_names=outputs,
                dynamic_shapes=dynamic_shapes(graph),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the exporter's own errors are long: keep its first line
            cause = e.__cause__ or e  # torch.onnx wraps torch.export's error in three paragraphs
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise GraftError(
                f"export: torch.onnx could not export this {graph.task} model ({reason})"
            ) from None
    program.save(str(path), external_data=path_too_big(graph))


def path_too_big(graph: torch.nn.Module) -> bool:
    """Protobuf files stop at 2 GB: larger models keep their weights in a file next to the graph."""
    size = sum(p.numel() * p.element_size() for p in graph.parameters())
    return size > 1_800_000_000


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(path: Path) -> Runner:
    """A function of numpy inputs -> the graph's outputs, run by ONNX Runtime."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sess.run(None, {k: v for k, v in inputs.items() if k in names})

    return run


def optimize_onnx(source: Path, target: Path, graph: Graph) -> list[str]:
    """ONNX Runtime's transformer fusions (attention, skip-layer-norm, bias-GELU...) where they apply;
    the names of the fused operators found in the result."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = graph.config
    kind = "gpt2" if cfg.causal else "bert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(source), model_type=kind, num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, opt_level=1
        )
    model.save_model_to_file(str(target))
    fused = model.get_fused_operator_statistics()
    return sorted(name for name, n in fused.items() if n)


# The feed-forward down projections of the first two blocks stay float32 under --int8. Their input
# (the activation's output) has the widest outliers, and one uint8 scale per tensor cannot keep them.
# Measured on all-MiniLM-L6-v2 over the book's 96 texts (worst text's cosine to float32):
# all int8 0.9866, these two kept 0.9936, every down projection kept 0.9946 at 1.25x the int8 time
# (1 thread, a busy machine); keeping two cost no time measurable there.
FLOAT_UNDER_INT8 = re.compile(r"\.layers\.[01]\.ffn\.down'")


def kept_in_float(path: Path) -> list[str]:
    """The MatMul nodes of the graph at ``path`` that --int8 leaves in float32 (FLOAT_UNDER_INT8), found
    by the module path the dynamo exporter records on each node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = []
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if node.op_type == "MatMul" and FLOAT_UNDER_INT8.search(scopes):
            kept.append(node.name)
    return kept


def quantize_int8(source: Path, target: Path) -> list[str]:
    """ONNX Runtime's dynamic int8 quantization: int8 weights (a scale per output channel: per tensor
    lost too much of MiniLM's direction), activations quantized per call; the nodes kept in float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = kept_in_float(source)
    quantize_dynamic(
        str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept
    )
    return kept
