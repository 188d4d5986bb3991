"""Export (chapter 8): a graft model leaves Python as ONNX (run by ONNX Runtime).

    from graft.export import export_model
    export_model(model, "out/", tokenizer, fmt="onnx")   # parity-checked, written atomically

What OUT/ holds: ``model.onnx``, the tokenizer files, ``labels.json`` (the label map of a
classifier or tagger), ``config.json`` (the model's HF config: the head is rebuilt from it) and
``manifest.json``: the format, the task, every input and output with its dtype and shape (axis
names for dynamic axes), graft's version and the parity measured at export.

The graph is traced from graft.nn's plain reference code (``graft.kernels.reference``), LoRA
merged first. Encoders and task heads: (input_ids, attention_mask[, token_type_ids]) -> one
output. Decoders (causal LM) export ONE merged graph for the prompt and every step, with the
KV cache as plain tensors:

    inputs   input_ids (B, T), attention_mask (B, P + T), position_ids (B, T),
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) for every layer i
    outputs  logits (B, T, V), present.{i}.key / .value (B, kv_heads, P + T, head_dim)

The prompt runs with P = 0 (empty past tensors), each step feeds one token per row and the
previous call's presents; positions count real tokens from 0 (left padding), as graft's
generation does. One graph, so one file and one loop, and no shape mismatch between two graphs.

Two-stack models export one graph per stack, each a file of its own, listed in the manifest's
``graphs`` (name -> file, inputs, outputs, max_abs_diff); ``file``/``inputs``/``outputs`` are the
first graph's. An encoder-decoder (T5, mT5, BART, mBART, Whisper; seq2seq or the bare body) is
``encoder`` + ``decoder`` (manifest cache layout "encoder + decoder-with-past"):

    encoder  input_ids, attention_mask (B, S) or Whisper's input_features (B, mel bins, frames)
             -> encoder_hidden_states (B, S, H), cross.{i}.key / .value (B, kv_heads, S, head_dim)
    decoder  decoder_input_ids (B, T), encoder_attention_mask (B, S) (not Whisper's),
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim), cross.{i}.key / .value
             -> logits (B, T, V) (the bare body: last_hidden_state), present.{i}.key / .value

The cross-attention keys and values are computed once, by the encoder graph; the decoder graph
runs the start token(s) with an empty past (P = 0), then one token per step with the presents fed
back. Decoder rows are not padded (as graft's generation). CLIP exports ``text`` (input_ids,
attention_mask -> text_embeds) and ``image`` (pixel_values -> image_embeds), projected and not
normalized, and for the image-text task ``logits`` (pixel_values (N, ...), input_ids (M, T) ->
logits_per_image (N, M)).

The export is checked against graft's eager model on shapes that were not traced (padding
included): max abs difference <= 1e-4 in float32, or the export stops, writing nothing.
``dtype="bfloat16"`` (torchscript and exported-program only: ONNX Runtime's CPU provider has no
bfloat16 MatMul) keeps the weights and the computation in bfloat16 behind float32 inputs and
outputs, checked against graft's bfloat16 model at 1e-2. ``--int8`` keeps blocks 0 and 1's
feed-forward down projections in float32 (graft/export/onnx.py says why); the int8 graph is judged
against the float32 one: a label head by argmax agreement on real rows (``--check-data``), anything
else, and a label head without them, by every row's cosine (check.py int8_verdict, docs/export.md).

An exported folder refuses an input row whose attention_mask is all zeros (runtime.py empty_row),
in every format, with one line naming the row. Such a row has no real token and its output means
nothing, and the runtimes disagree on it: graft's model gives it zero attention (as transformers'
sdpa attention does under torch 2.13), ONNX Runtime's fused MultiHeadAttention (--optimize) uniform
attention over the padding (as transformers' eager attention does).
A tokenizer gives even an empty text its special tokens, so only a hand-made mask has such a row.

An embedding model normalized in the graph divides by the norm written as ReduceSum -> Sqrt -> Max
(graft.tasks.embedding.unit_length), not F.normalize: ONNX Runtime's shape inference stops at F.normalize's Expand,
and --optimize then fuses no layer norm in the whole graph.

A Whisper export holds what ``graft transcribe OUT/ audio.wav`` reads besides the graphs: the
source folder's generation_config.json (the prompt tokens and suppressed tokens) and
preprocessor_config.json (the feature extractor's, written when the source has none).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graft
import graft.kernels
from graft.errors import GraftError
from graft.export.check import (
    BF16_TOLERANCE,
    CHECK_SHAPES,
    DTYPES,
    FP32_TOLERANCE,
    INT8_MIN_AGREEMENT,
    INT8_MIN_COSINE,
    LABEL_TASKS,
    TRACE_SHAPE,
    Int8Check,
    agreement,
    check_int8_data,
    int8_verdict,
    max_abs_diff,
    parity_cases,
)
from graft.export.graph import (
    OUTPUTS,
    DecoderGraph,
    EncoderGraph,
    Graph,
    ImageGraph,
    Seq2SeqDecoderGraph,
    SimilarityGraph,
    Tensor,
    TowerGraph,
    graphs_for,
    task_of,
)
from graft.io.atomic import atomic_folder, write_json
from graft.models import FAMILIES
from graft.nn import DualEncoder, EncoderDecoder
from graft.tasks import HEADS, TaskModel
from graft.tasks.base import body_of, one_stack

log = logging.getLogger("graft")

FORMATS = ("onnx", "torchscript", "exported-program")
MANIFEST = "manifest.json"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "exported-program": "model.pt2"}
EXPORTERS = {
    "onnx": "torch.onnx.export(dynamo=True)",
    "torchscript": "torch.jit.trace",
    "exported-program": "torch.export.export",
}
SEQ2SEQ_TASKS = ("base", "seq2seq")  # an encoder-decoder's: the bare body, or with its LM head
DUAL_TASKS = ("base", "image-text")  # a dual encoder's: its towers, and with the task their logits
# what graft generate and transcribe read from a model's folder besides config.json and the weights
RUN_FILES = ("generation_config.json", "preprocessor_config.json")


def check_request(
    model: nn.Module,
    fmt: str,
    opset: int | None = None,
    optimize: bool = False,
    int8: bool = False,
    dtype: str = "float32",
    int8_check: Int8Check | None = None,
) -> None:
    """Refuse, in one line and before any work, what cannot be exported."""
    if fmt not in FORMATS:
        raise GraftError(f"export: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    check_dtype(fmt, dtype, int8)
    onnx_only = [
        flag
        for flag, on in (("--opset", opset is not None), ("--optimize", optimize), ("--int8", int8))
        if on
    ]
    if fmt != "onnx" and onnx_only:
        raise GraftError(f"export: {onnx_only[0]} is for --format onnx, not {fmt}")
    body, task = body_of(model), task_of(model)
    if isinstance(body, EncoderDecoder):  # two graphs: the encoder, and the decoder with its cache
        if task not in SEQ2SEQ_TASKS:
            raise GraftError(
                f"export: the {task} task of a {body.config.family} model cannot be exported "
                f"(known: {', '.join(SEQ2SEQ_TASKS)})"
            )
    elif isinstance(body, DualEncoder):  # a graph per tower
        if task not in DUAL_TASKS:
            raise GraftError(
                f"export: the {task} task of a {body.config.family} model cannot be exported "
                f"(known: {', '.join(DUAL_TASKS)})"
            )
    else:
        body = one_stack(model, "export")
        cfg = body.config
        if cfg.family not in FAMILIES or cfg.inputs not in ("tokens", "patches") or cfg.cross_attention:
            raise GraftError(
                f"export: the {cfg.family} family cannot be exported (graft exports {', '.join(FAMILIES)})"
            )
        if task == "seq2seq" or task != "base" and task not in HEADS or task not in OUTPUTS:
            raise GraftError(f"export: the {task} task cannot be exported (known: {', '.join(OUTPUTS)})")
        if task == "causal-lm" and not cfg.causal:
            raise GraftError(f"export: a {cfg.family} model has no causal LM to export")
    hooked = [
        name or "the model"
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]
    if hooked:
        raise GraftError(
            f"export: {hooked[0]} has hooks, which an exported graph cannot run; remove them before exporting"
        )
    if getattr(body, "virtual_tokens", 0) or any(n.endswith("prefix") for n, _ in body.named_modules()):
        raise GraftError(
            "export: prompt and prefix tuning cannot be exported (their virtual tokens change the "
            "graph's positions); train with lora or adapters to export"
        )
    if opset is not None and fmt == "onnx":
        from graft.export.onnx import check_opset

        check_opset(opset)
    if int8_check is not None:
        if not int8:
            raise GraftError(
                "export: --check-data, --min-agreement and --min-cosine judge the --int8 graph: add --int8"
            )
        check_int8_data(task, int8_check)


def check_dtype(fmt: str, dtype: str, int8: bool = False) -> None:
    if dtype not in DTYPES:
        raise GraftError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and (fmt != "torchscript" and fmt != "exported-program" or int8):
        raise GraftError(
            "--dtype bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul); export "
            "bfloat16 with --format torchscript or exported-program, or a smaller ONNX file with --int8"
        )


def prepared(model: nn.Module, dtype: str = "float32") -> nn.Module:
    """A copy to trace: LoRA merged, on graft.nn's reference code, in eval mode and ``dtype``."""
    import copy

    from graft.strategies import merge_and_unload

    kernels = graft.kernels.kernels_of(model)
    model.__dict__.pop("kernels", None)  # not deep-copied: the copy runs the reference code
    try:
        copied = copy.deepcopy(model)
    finally:
        if kernels is not None:
            model.kernels = kernels
    copied = graft.kernels.reference(merge_and_unload(copied))
    return copied.to(DTYPES[dtype]).eval()


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The config.json a loader reads to rebuild the head (as save_model writes it, without weights)."""
    cfg = body_of(model).config
    family = FAMILIES[cfg.family]
    task = task_of(model)
    kept = {k: v for k, v in cfg.hf_config.items() if not k.startswith("graft_")}
    extra = model.head.hf_config() if isinstance(model, TaskModel) else {}
    if task not in family.architectures:
        extra = {**extra, "graft_task": task}
    hf = {**kept, **family.config_to_hf(cfg), **extra}
    hf["architectures"] = [family.architectures.get(task, family.architectures["base"])]
    return hf


def seq2seq_signature(graph: EncoderGraph | Seq2SeqDecoderGraph) -> tuple[list[Tensor], list[Tensor]]:
    """An encoder-decoder's graphs: the encoder's source axis, the decoder's cache axes."""
    enc, dec = graph.body.config.encoder, graph.body.config.decoder

    def cache(name: str) -> Tensor:  # cross keys/values span the source; past and present the decoder's
        axis = {"cross": "source", "past_key_values": "past_sequence", "present": "total_sequence"}
        return Tensor(name, "float32", ("batch", dec.num_kv_heads, axis[name.split(".")[0]], dec.head_dim))

    if isinstance(graph, EncoderGraph):
        if graph.audio:  # whole windows of the config's frames
            inputs = [Tensor("input_features", "float32", ("batch", enc.num_mel_bins, 2 * enc.max_positions))]
        else:
            inputs = [Tensor(name, "int64", ("batch", "source")) for name in graph.input_names()]
        hidden = Tensor("encoder_hidden_states", "float32", ("batch", "source", enc.hidden_size))
        return inputs, [hidden, *map(cache, graph.output_names()[1:])]
    tokens = {
        "decoder_input_ids": Tensor("decoder_input_ids", "int64", ("batch", "sequence")),
        "encoder_attention_mask": Tensor("encoder_attention_mask", "int64", ("batch", "source")),
    }
    inputs = [tokens[name] if name in tokens else cache(name) for name in graph.input_names()]
    first, *present = graph.output_names()
    width = dec.vocab_size if graph.task == "seq2seq" else dec.hidden_size
    return inputs, [Tensor(first, "float32", ("batch", "sequence", width)), *map(cache, present)]


def tower_signature(graph: TowerGraph) -> tuple[list[Tensor], list[Tensor]]:
    """A dual encoder's graphs: texts and images, each batch of its own in the similarity graph."""
    vision, dim = graph.body.config.vision, graph.body.config.projection_dim
    image = ("batch", vision.num_channels, vision.image_size, vision.image_size)
    if isinstance(graph, SimilarityGraph):
        texts = [Tensor(name, "int64", ("texts", "sequence")) for name in ("input_ids", "attention_mask")]
        pixels = Tensor("pixel_values", "float32", ("images", *image[1:]))
        return [pixels, *texts], [Tensor("logits_per_image", "float32", ("images", "texts"))]
    if graph.tower == "image":
        inputs = [Tensor("pixel_values", "float32", image)]
    else:
        inputs = [Tensor(name, "int64", ("batch", "sequence")) for name in graph.input_names()]
    return inputs, [Tensor(graph.output_names()[0], "float32", ("batch", dim))]


def signature(graph: Graph) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's inputs and outputs as the manifest lists them."""
    if isinstance(graph, EncoderGraph | Seq2SeqDecoderGraph):
        return seq2seq_signature(graph)
    if isinstance(graph, TowerGraph):
        return tower_signature(graph)
    cfg = graph.config
    if isinstance(graph, DecoderGraph):
        cache = ("batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim)
        present = ("batch", cfg.num_kv_heads, "total_sequence", cfg.head_dim)
        inputs = [
            Tensor("input_ids", "int64", ("batch", "sequence")),
            Tensor("attention_mask", "int64", ("batch", "total_sequence")),
            Tensor("position_ids", "int64", ("batch", "sequence")),
        ] + [Tensor(name, "float32", cache) for name in graph.input_names()[3:]]
        outputs = [Tensor("logits", "float32", ("batch", "sequence", cfg.vocab_size))] + [
            Tensor(name, "float32", present) for name in graph.output_names()[1:]
        ]
        return inputs, outputs
    task = graph.task
    if isinstance(graph, ImageGraph):
        inputs = [
            Tensor("pixel_values", "float32", ("batch", cfg.num_channels, cfg.image_size, cfg.image_size))
        ]
    else:
        inputs = [Tensor(name, "int64", ("batch", "sequence")) for name in graph.input_names()]
    width = {
        "base": ("sequence", cfg.hidden_size),
        "embedding": (cfg.hidden_size,),
        "question-answering": ("sequence", 2),
        "masked-lm": ("sequence", cfg.vocab_size),
    }
    if isinstance(graph, ImageGraph):
        width["base"] = (cfg.num_patches + cfg.prefix_tokens, cfg.hidden_size)
    if task in ("classification", "token-classification", "image-classification"):
        labels = len(graph.model.head.id2label)
        shape = ("sequence", labels) if task == "token-classification" else (labels,)
    else:
        shape = width[task]
    return inputs, [Tensor(OUTPUTS[task], "float32", ("batch", *shape))]


def export_model(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any = None,
    fmt: str = "onnx",
    opset: int | None = None,
    tolerance: float | None = None,
    optimize: bool = False,
    int8: bool = False,
    dtype: str = "float32",
    source: str | Path | None = None,
    int8_check: Int8Check | None = None,
    own_ops: bool = True,
) -> dict[str, Any]:
    """Export ``model`` (a body or a task model) to the folder ``out``; its manifest.

    ``source``: the model's folder, whose RUN_FILES (what generate and transcribe read besides the
    weights) are copied into ``out``; an audio model's export without a preprocessor_config.json gets
    the default feature extractor's, at the model's mel bins.

    ``dtype`` bfloat16 (torchscript and exported-program): the weights and the computation in
    bfloat16, behind float32 inputs and outputs (graph.Float32Interface), checked against graft's
    eager model in bfloat16 at BF16_TOLERANCE; ``tolerance`` defaults to the dtype's.

    ``int8``: the quantized graph is judged against the float32 one by ``int8_check`` (default
    Int8Check(): a label head's argmax agreement on its ``cases``, real rows from record_cases, else
    every row's cosine on the parity check's random-token rows; graft/export/check.py says why).

    ``own_ops`` (ONNX): graft's translations of attention and GELU (graft/export/ops.py), else
    torchlib's (--format web's page: graft/export/web.py says why).

    The folder appears whole or not at all: a failed parity or int8 check raises a GraftError with
    the measured figures and leaves ``out`` as it was.
    """
    from graft.export import onnx as onnx_export

    check_request(model, fmt, opset, optimize, int8, dtype, int8_check)
    int8_check = int8_check or Int8Check()
    if fmt == "onnx":
        opset = opset if opset is not None else onnx_export.DEFAULT_OPSET
    if tolerance is None:
        tolerance = BF16_TOLERANCE if dtype == "bfloat16" else FP32_TOLERANCE
    model = prepared(model, dtype)
    graphs = {name: graph.eval() for name, graph in graphs_for(model).items()}
    cases = parity_cases(graphs)
    with tempfile.TemporaryDirectory(prefix="graft-export-") as work:
        written = {}
        for name, graph in graphs.items():  # one file each: model.onnx, or encoder.onnx + decoder.onnx
            file = MODEL_FILES[fmt] if name == "model" else name + Path(MODEL_FILES[fmt]).suffix
            written[name] = export_graph(
                graph,
                Path(work) / file,
                fmt,
                opset,
                cases[name],
                tolerance,
                optimize,
                int8 and int8_check,
                own_ops,
            )
        first = next(iter(graphs.values()))
        worst = max(info["max_abs_diff"] for _, info in written.values())
        manifest = {
            "format": fmt,
            "file": written[next(iter(graphs))][0].name,  # the first graph's (the encoder's)
            "graft_version": graft.__version__,
            "torch_version": torch.__version__,
            "exporter": EXPORTERS[fmt],
            "opset": opset,  # None but for onnx
            "dtype": dtype,  # of the weights and the computation; inputs and outputs are float32
            "family": body_of(model).config.family,
            "task": first.task,
            "inputs": written[next(iter(graphs))][1]["inputs"],
            "outputs": written[next(iter(graphs))][1]["outputs"],
            "graphs": {name: info for name, (_, info) in written.items()},
            "parity": {
                "max_abs_diff": worst,
                "tolerance": tolerance,
                "traced_shape": list(TRACE_SHAPE),
                "checked_shapes": [list(s) for s in CHECK_SHAPES],
            },
            "optimized": {"fused": sorted({f for _, i in written.values() for f in i["fused"]})}
            if optimize
            else None,
            "int8": int8_summary([info["int8"] for _, info in written.values()], int8_check)
            if int8
            else None,
        }
        if isinstance(first, DecoderGraph):
            manifest["cache"] = {
                "layout": "merged",  # one graph: empty past for the prompt, then one token per step
                "layers": first.layers,
                "kv_heads": first.config.num_kv_heads,
                "head_dim": first.config.head_dim,
                "positions": "count real tokens from 0 (left padding)",
            }
        if "decoder" in graphs:
            body = graphs["decoder"].body
            manifest["cache"] = {
                # the encoder graph once (with every layer's cross keys and values), then the decoder
                # graph for the start tokens (empty past) and one token per step
                "layout": "encoder + decoder-with-past",
                "layers": graphs["decoder"].layers,
                "kv_heads": body.config.decoder.num_kv_heads,
                "head_dim": body.config.decoder.head_dim,
                "decoder_start_token_id": body.config.decoder_start_token_id,
            }
        with atomic_folder(out) as folder:
            for path, _ in written.values():
                (folder / path.name).write_bytes(path.read_bytes())
            write_files(folder, model, tokenizer, manifest, source)
    return manifest


def export_graph(
    graph: Graph,
    path: Path,
    fmt: str,
    opset: int | None,
    cases: list,
    tolerance: float,
    optimize: bool,
    int8: Int8Check | bool,
    own_ops: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Write one graph to ``path``, check it (then its optimized and int8 forms) on ``cases``; the
    final file and what the manifest says of it. ``int8``: the int8 check (int8_verdict), or False."""
    from graft.export import onnx as onnx_export
    from graft.export import pytorch

    if fmt == "onnx":
        onnx_export.export_onnx(graph, path, opset, own_ops)
    elif fmt == "torchscript":
        pytorch.export_torchscript(graph, path)
    else:
        pytorch.export_program(graph, path)
    what = {
        "onnx": "ONNX Runtime",
        "torchscript": "the TorchScript file",
        "exported-program": "the exported program",
    }
    diff = check_parity(path, cases, tolerance, what[fmt], fmt, graph.input_names())
    fused: list[str] = []
    if optimize:
        optimized = path.with_name("optimized.onnx")
        fused = onnx_export.optimize_onnx(path, optimized, graph)
        diff = max(diff, check_parity(optimized, cases, tolerance, "the optimized graph"))
        path = optimized.replace(path)
    quantized = None
    if int8:
        target = path.with_name("int8.onnx")
        problem = getattr(getattr(getattr(graph, "model", None), "head", None), "problem_type", None)
        task = "base" if problem == "regression" else graph.task  # values, not choices: by cosine
        by_decisions = task in LABEL_TASKS and int8.cases is not None  # judged on real rows' argmaxes
        kept = onnx_export.quantize_int8(path, target, keep_float=not by_decisions)
        rows = int8.cases if int8.cases is not None else cases
        multi = problem == "multi_label"
        quantized = agreement(onnx_export.runner(target), onnx_export.runner(path), rows, task, multi)
        quantized["checked"] = int8_verdict(quantized, task, int8, multi)
        quantized["float32_nodes"] = len(kept)
        path = target.replace(path)
    inputs, outputs = signature(graph)
    info = {
        "file": path.name,
        "inputs": [t.as_json() for t in inputs],
        "outputs": [t.as_json() for t in outputs],
        "max_abs_diff": diff,
        "fused": fused,
        "int8": quantized,
    }
    return path, info


def int8_summary(graphs: list[dict[str, Any]], check: Int8Check) -> dict[str, Any]:
    """The manifest's ``int8``: each figure at its worst over the graphs, what was checked and how."""
    summary = {
        "checked": "; ".join(g["checked"] for g in graphs),  # as the int8_verdict lines say it
        "check_data": check.data,  # None: the parity check's random-token rows
        "rows": sum(g["rows"] for g in graphs),
        "min_cosine": min(g["min_cosine"] for g in graphs),
        "argmax_agreement": min(g["argmax_agreement"] for g in graphs),
        "min_agreement_wanted": check.min_agreement,
        "min_cosine_wanted": check.min_cosine,
        "float32_nodes": sum(g["float32_nodes"] for g in graphs),
    }
    shifts = [g["max_probability_shift"] for g in graphs if "max_probability_shift" in g]
    if shifts:  # a label head's: the largest total-variation distance of a row's probabilities
        summary["max_probability_shift"] = max(shifts)
    return summary


def file_runner(fmt: str, path: Path, names: list[str]):
    """A function of numpy inputs -> the outputs of the exported file at ``path``."""
    from graft.export import onnx as onnx_export
    from graft.export import pytorch

    return onnx_export.runner(path) if fmt == "onnx" else pytorch.runner(fmt, path, names)


def check_parity(
    path: Path, cases: list, tolerance: float, what: str, fmt: str = "onnx", names: list[str] = ()
) -> float:
    """The measured max abs difference of the graph at ``path``; a GraftError past ``tolerance``."""
    diff = max_abs_diff(file_runner(fmt, path, list(names)), cases)
    if not diff <= tolerance:  # NaN fails too
        raise GraftError(
            f"export: parity check failed: {what} differs from graft by {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    return diff


def write_files(
    folder: Path, model: nn.Module, tokenizer: Any, manifest: dict[str, Any], source: str | Path | None = None
) -> None:
    """The files around the graph: config, labels, the source's RUN_FILES, tokenizer (or image
    processor), manifest."""
    write_json(folder / "config.json", hf_config(model))
    for name in RUN_FILES:
        if source is not None and (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)
    body = body_of(model)
    audio = isinstance(body, EncoderDecoder) and body.config.encoder.inputs == "audio_frames"
    if audio and not (folder / "preprocessor_config.json").exists():  # transcribe reads it
        from graft.speech import WhisperFeatures

        write_json(
            folder / "preprocessor_config.json",
            WhisperFeatures(n_mels=body.config.encoder.num_mel_bins).to_dict(),
        )
    labels = getattr(getattr(model, "head", None), "id2label", None)
    if labels is not None:
        write_json(folder / "labels.json", {"id2label": list(labels)})
    if tokenizer is not None:
        tokenizer.save(folder)
    if manifest["format"] == "onnx":  # runs the folder with onnxruntime, tokenizers and numpy alone
        shutil.copyfile(Path(__file__).with_name("runtime.py"), folder / "runtime.py")
    manifest["files"] = sorted(p.name for p in folder.iterdir()) + [MANIFEST]
    write_json(folder / MANIFEST, manifest)


__all__ = [
    "FORMATS",
    "INT8_MIN_AGREEMENT",
    "INT8_MIN_COSINE",
    "LABEL_TASKS",
    "MANIFEST",
    "Int8Check",
    "check_request",
    "export_model",
]
