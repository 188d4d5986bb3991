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
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    import onnx

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


def export_onnx(graph: Graph, path: Path, opset: int, own_ops: bool = True) -> None:
    """Write ``graph`` to ``path`` (weights inside the file, or next to it past 2 GB). ``own_ops``: graft's
    translations of attention and GELU (graft/export/ops.py), else torchlib's."""
    from graft.export.ops import translations

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
                custom_translation_table=translations() if own_ops else None,  # ops.py says why
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
    """ONNX Runtime's transformer fusions (skip-layer-norm, bias-GELU...) where they apply, then
    graft's own attention fusion for encoders (fuse_attention); the names of the fused operators."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = graph.config
    kind = "gpt2" if cfg.causal else "bert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(source), model_type=kind, num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, opt_level=1
        )
    # optimize_model drops every node's metadata, the module paths --int8 picks its float32 nodes by
    # (kept_in_float): give them back to the nodes it kept by name
    import onnx

    scopes = {n.name: n.metadata_props for n in onnx.load(str(source), load_external_data=False).graph.node}
    for node in model.model.graph.node:
        if node.name in scopes and not node.metadata_props:
            node.metadata_props.extend(scopes[node.name])
    fused = {name for name, n in model.get_fused_operator_statistics().items() if n}
    if not cfg.causal and fuse_attention(model.model, cfg.num_heads):
        fused.add("MultiHeadAttention")
    model.save_model_to_file(str(target))
    return sorted(fused)


# The feed-forward down projections of the first two blocks stay float32 under --int8. Their input
# (the activation's output) has the widest outliers, and one uint8 scale per tensor cannot keep them.
# Measured on all-MiniLM-L6-v2 over the book's 96 texts (worst text's cosine to float32):
# all int8 0.9866, these two kept 0.9936, every down projection kept 0.9946 at 1.25x the int8 time
# (1 thread, a busy machine). Keeping two costs time on short texts: one 20-token text took 2.55 ms of
# CPU against 2.13 ms all int8 (1 thread, --optimize, best of 7), and all int8 fails the 0.99 check.
# On a BBC News classifier (MiniLM fine-tuned on 800 articles; 200 held-out ones at 128 tokens, --optimize)
# no choice moved its decisions: argmax agreement 0.995 all int8 and with these two kept, 0.995 with
# every down projection kept, 1.0 with block 5 kept whole too (+6% CPU time), accuracy 0.945-0.95 each
# (float32 0.945); the embeddings' tables kept float32 doubled the file for nothing. So a label head
# judged by its decisions on real rows (--check-data) is quantized whole: the same decisions, 12% less
# CPU on short texts and 22% less at 128 tokens (1 thread, that classifier); the check guards it.
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


def quantize_int8(source: Path, target: Path, keep_float: bool = True) -> list[str]:
    """ONNX Runtime's dynamic int8 quantization: int8 weights (a scale per output channel: per tensor
    lost too much of MiniLM's direction), activations quantized per call; the nodes kept in float32
    (FLOAT_UNDER_INT8 with ``keep_float``, else none). Where this CPU's u8 x s8 products sum pairs
    in int16 (x86 without VNNI: graft.kernels.int8.pairs_saturate), uint8 weights (each channel its
    own zero point), which ONNX Runtime multiplies exactly there (u8 x u8 through int16, as the
    "quint8_avx2" models published for such CPUs): with int8 weights an AMD EPYC 7003 ran a tiny
    classifier's graph at cosine 0.95 to float32, and with 7-bit ones (reduce_range) it changed
    labels."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from graft.kernels.int8 import pairs_saturate

    kept = kept_in_float(source) if keep_float else []
    root = logging.getLogger()  # the quantizer logs through the root logger (logging.warning)
    root.addFilter(not_the_preprocessing_hint)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QUInt8 if pairs_saturate() else QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=kept,
        )
    finally:
        root.removeFilter(not_the_preprocessing_hint)
    return kept


def not_the_preprocessing_hint(record: logging.LogRecord) -> bool:
    """False for quantize_dynamic's "Please consider to run pre-processing before quantization" (its
    other notes pass). That pre-processing (symbolic shape inference, ONNX Runtime's basic graph
    optimizations) is for graphs whose tensor types ONNX's own shape inference cannot follow, which
    quantize_dynamic runs itself: on graft's graphs it follows them (a MiniLM classifier --optimize'd
    had all 38 of its weight MatMuls and Gemms quantized), so the note, printed on every --int8,
    asked a user of graft export for nothing."""
    return not record.getMessage().startswith("Please consider to run pre-processing")


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace each self-attention block of an encoder's dynamo graph with ONNX Runtime's
    MultiHeadAttention; the number replaced.

    Why graft does it: ONNX Runtime's own attention fusion looks for the TorchScript exporter's
    pattern (constant reshape targets, its mask arithmetic) and finds none in the dynamo exporter's,
    so --optimize would leave the attention unfused. The pattern matched here, per block, is what
    graft's translation of attention writes (graft/export/ops.py), with (B, S, D) projections
    q, k, v:

        Softmax(MatMul(Mul(Transpose(Reshape(q)), c), Transpose(Reshape(k))) + Where(
            attention_mask[:, None, None, :], 0, min)) -> MatMul(., Transpose(Reshape(v)))
        -> Transpose -> Reshape (B, S, D)

    (no Mul when the scale c is 1; K's two Transposes, the head split's and attention's, merged
    into one or not). The mask must be the padding mask straight from the ``attention_mask`` input
    (key padding: no causal or windowed mask is matched). A block that differs in any node is left
    as it was; the export's parity check then runs on the result.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    made = {o: n for n in graph.node for o in n.output}
    used: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            used.setdefault(name, []).append(n)
    # the small ones only: scales, axes, fill values (the weights need not be copied out)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer if np.prod(i.dims) <= 8}

    def node(name: str, op: str, perm: list[int] | None = None):
        """The node making ``name`` if it is an ``op`` (with ``perm``) whose output only one node reads
        (besides Shape nodes: the exporter reads a shape to build the next reshape's target)."""
        n = made.get(name)
        readers = [r for r in used.get(name, []) if r.op_type != "Shape"]
        if n is None or n.op_type != op or len(readers) != 1:
            return None
        if perm is not None:
            attr = next((a for a in n.attribute if a.name == "perm"), None)
            if attr is None or list(attr.ints) != perm:
                return None
        return n

    def scalar(name: str) -> float | None:
        value = constants.get(name)
        return float(value) if value is not None and value.size == 1 else None

    def padding_mask(name: str) -> bool:
        """``name`` = Where(Cast(Unsqueeze(attention_mask, [1, 2])), 0, a large negative)."""
        where = made.get(name)
        if where is None or where.op_type != "Where" or scalar(where.input[1]) != 0.0:
            return False
        if (scalar(where.input[2]) or 0.0) > -1e30:
            return False
        cast = made.get(where.input[0])
        unsqueeze = made.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.input[0] != "attention_mask":
            return False
        axes = constants.get(unsqueeze.input[1])
        return axes is not None and axes.tolist() == [1, 2]

    def projection(name: str, steps: list[tuple[str, list[int] | None]]) -> str | None:
        """Walk ``steps`` up from ``name`` (op, perm); the (B, S, D) tensor the last Reshape reads."""
        for op, perm in steps:
            n = node(name, op, perm)
            if n is None:
                return None
            name = n.input[0]
        return name

    fused = []  # (the output Reshape, the MultiHeadAttention node)
    for softmax in graph.node:
        if softmax.op_type != "Softmax":
            continue
        add = node(softmax.input[0], "Add")
        if add is None or not padding_mask(add.input[1]):
            continue
        scores = node(add.input[0], "MatMul")
        if scores is None:
            continue
        q_scale = node(scores.input[0], "Mul")  # absent when the scale is 1
        c = scalar(q_scale.input[1]) if q_scale is not None else 1.0
        heads_q = q_scale.input[0] if q_scale is not None else scores.input[0]
        q = projection(heads_q, [("Transpose", [0, 2, 1, 3]), ("Reshape", None)])
        # K^T: the head split's Transpose and attention's merged into one, or the two of them
        k = projection(scores.input[1], [("Transpose", [0, 2, 3, 1]), ("Reshape", None)]) or projection(
            scores.input[1], [("Transpose", [0, 1, 3, 2]), ("Transpose", [0, 2, 1, 3]), ("Reshape", None)]
        )
        readers = used.get(softmax.output[0], [])
        if None in (c, q, k) or len(readers) != 1:
            continue
        mixed = readers[0]
        if mixed.op_type != "MatMul" or mixed.input[0] != softmax.output[0]:
            continue
        v = projection(mixed.input[1], [("Transpose", [0, 2, 1, 3]), ("Reshape", None)])
        heads = used.get(mixed.output[0], [])
        back = heads[0] if len(heads) == 1 else None
        if v is None or back is None or node(back.output[0], "Transpose", [0, 2, 1, 3]) is None:
            continue
        out = used.get(back.output[0], [])
        if len(out) != 1 or out[0].op_type != "Reshape":
            continue
        mha = helper.make_node(
            "MultiHeadAttention",
            [q, k, v, "", "attention_mask_int32"],
            [out[0].output[0]],
            name=f"MultiHeadAttention_{len(fused)}",
            domain="com.microsoft",
            num_heads=num_heads,
            scale=c,
        )
        fused.append((out[0], mha))
    if not fused:
        return 0
    replace = {id(old): new for old, new in fused}
    nodes = [replace.get(id(n), n) for n in graph.node]
    cast = helper.make_node("Cast", ["attention_mask"], ["attention_mask_int32"], to=onnx.TensorProto.INT32)
    del graph.node[:]
    graph.node.extend([cast, *prune(nodes, {o.name for o in graph.output})])
    keep = {name for n in graph.node for name in n.input}
    live = [i for i in graph.initializer if i.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def prune(nodes: list, outputs: set[str]) -> list:
    """``nodes`` less those whose outputs nothing reads (repeated: a removal can orphan its inputs)."""
    while True:
        read = outputs | {name for n in nodes for name in n.input}
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive
