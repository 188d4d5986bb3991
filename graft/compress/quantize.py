"""Quantization in torch (chapter 8): a float checkpoint -> an int8 or bf16 one that graft loads back.

Methods (graft.kernels.int8.METHODS):

- ``int8-dynamic``: the linear layers of every block hold int8 weights with one scale per output
  channel, and quantize their input per row (token) at run time: int8 x int8 products on oneDNN
  (a decoder's Q/K/V and feed-forward down projections keep float inputs, whose outlier channels
  one scale per row flattens: see graft.loading.DYNAMIC_FLOAT_INPUTS).
- ``int8-weight``: the same int8 weights; activations stay float (decoding reads a quarter of
  the bytes; many rows dequantize the weight per call).
- ``bf16``: every weight in bfloat16.
- ``int4-weight`` (decoders: decoding is memory-bound): the linear layers of the blocks hold 4-bit
  codes with a scale and a minimum per group of 32 inputs (w = scale * q + min, llama.cpp's Q4_1)
  and multiply bf16 activations on torch's CPU int4 kernel (graft.kernels.int4). From a GGUF file,
  the linears it stores as Q4_0 / Q4_1 keep their blocks exactly; the others are grouped from their
  float values. The embeddings and the LM head stay float. "X.weight" holds two codes per byte
  (uint8, input 2j in the low nibble; not the kernel's layout, which depends on the CPU), next to
  fp32 "X.weight_scale" and "X.weight_min" (out, in / 32).

Every stack is quantized: an encoder-decoder's two (T5, BART, Whisper: cross-attention and the
context projection included) and CLIP's two towers (its projections into the shared space stay
float, as a pooler). The token tables become int8 too (one scale per token; they are half of
MiniLM's bytes, and SmolLM2's LM head), one table where two stacks share it. An output layer tied
to the table (the LM head of SmolLM2, GPT-2, T5, BART; BERT's MLM decoder) reads the same int8
rows, a token's scale being its output channel's, with float inputs: at decoding SmolLM2's head
was a third of a token's time in fp32 (its 113 MB), 0.7 ms on the int8 kernel.
What stays float, and why: the position embeddings and layer norms (few numbers, and
sensitive), BERT's pooler and the task heads' own weights (an untied LM head among them). The saved
config.json says so under "quantization_config" (quant_method "graft", so transformers does not
mistake it for a format it reads). Weights go into model.safetensors as int8 ("X.weight") next to
fp32 scales ("X.weight_scale"), written atomically; ``graft.loading.load_model`` reads them back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError, did_you_mean
from graft.io.atomic import atomic_folder, check_output
from graft.io.hf import WEIGHT_FILES, resolve
from graft.kernels.int4 import METHOD as INT4
from graft.kernels.int4 import Int4Linear
from graft.kernels.int8 import METHODS, Int8Embedding, Int8Linear
from graft.loading import (
    DYNAMIC_FLOAT_INPUTS,
    QUANTIZATION,
    Model,
    check_quantizable,
    load_config,
    load_model,
    quantization,
    quantized,
    save_model,
    weight_map,
)
from graft.models import FAMILIES
from graft.tasks import TaskModel

FLOAT = (
    "position embeddings, layer norms, pooler (and CLIP's projections), the task head's own weights "
    "(an output layer tied to the token table reads the int8 table)"
)


def check_method(method: str) -> str:
    if method not in QUANTIZATION:
        known = ", ".join(QUANTIZATION)
        raise GraftError(
            f"--method: unknown method {method!r} (known: {known}){did_you_mean(method, QUANTIZATION)}"
        )
    return method


def quantization_config(method: str, layers: list[str], decoder: bool) -> dict[str, Any]:
    """What config.json says about a model quantized with ``method``: loading reads "method"."""
    config: dict[str, Any] = {"quant_method": "graft", "method": method}
    if method == INT4:
        config["weights"] = (
            "4-bit codes, a scale and a minimum per group of 32 inputs: w = scale * q + min "
            "(X.weight: two codes per byte, input 2j in the low nibble; X.weight_scale, X.weight_min)"
        )
        config["activations"] = "bfloat16 (the int4 kernel's inputs)"
        config["int4_layers"] = len(layers)
        config["float"] = "token embeddings, layer norms, LM head"
        return config
    if METHODS[method] is None:
        config["weights"] = "bfloat16"
        return config
    config["weights"] = "int8, symmetric, one fp32 scale per output channel (X.weight_scale)"
    config["activations"] = "int8 per row at run time" if METHODS[method] == "dynamic" else "float"
    floats = [n for n in layers if n.endswith(DYNAMIC_FLOAT_INPUTS)]
    if METHODS[method] == "dynamic" and decoder and floats:
        kinds = ", ".join(k.lstrip(".") for k in DYNAMIC_FLOAT_INPUTS)
        config["float_activations"] = f"{len(floats)} layers ({kinds}: outlier channels in their inputs)"
    config["int8_layers"] = len(layers)
    config["float"] = FLOAT
    return config


def quantize(model: Model, method: str) -> Model:
    """``model`` quantized with ``method`` (in place; returns it, bf16 by ``.to``).

    A model that is already quantized is refused: quantizing twice compounds the rounding.
    """
    check_method(method)
    body = model.body if isinstance(model, TaskModel) else model
    before = quantization(body.config.hf_config)
    if before is not None:
        raise GraftError(f"this model is already quantized ({before}); quantize the float model it came from")
    check_quantizable(method, FAMILIES[body.config.family], "--method")
    if method != INT4 and METHODS[method] is None:
        model.to(torch.bfloat16)
        layers: list[str] = []
    else:
        head = model.head if isinstance(model, TaskModel) else None
        quantized(body, method, head)  # (int4-weight: Int4Linear layers already there, a GGUF's blocks, stay)
        kinds = (Int4Linear,) if method == INT4 else (Int8Linear, Int8Embedding)
        layers = [n for n, m in body.named_modules() if isinstance(m, kinds)]
    decoder = FAMILIES[body.config.family].decoder
    body.config.hf_config["quantization_config"] = quantization_config(method, layers, decoder)
    return model


def quantize_folder(model: str | Path, out: str | Path, method: str, overwrite: bool = False) -> Path:
    """Quantize a checkpoint folder, Hub id or GGUF file into ``out``: config.json, model.safetensors
    and the source's other files (tokenizer, generation config) copied as they are; the folder is
    written whole or not at all. int4-weight from a GGUF file keeps its Q4_0 / Q4_1 blocks as they are."""
    check_method(method)
    out = check_output(out, "OUT", folder=True, overwrite=overwrite)
    if str(model).endswith(".gguf"):
        from graft.io.gguf import convert_gguf

        with tempfile.TemporaryDirectory(prefix="graft-gguf-") as tmp:
            return write_quantized(convert_gguf(model, Path(tmp) / "model"), out, method, Path(model))
    return write_quantized(resolve(model), out, method)


def write_quantized(folder: Path, out: Path, method: str, gguf: Path | None = None) -> Path:
    before = quantization(load_config(folder)[1].hf_config)  # (a bad config.json: its path in the line)
    if before is not None:
        raise GraftError(f"{folder}: already quantized ({before}); quantize the float model it came from")
    m = load_model(folder, kernels=False)
    body = m.body if isinstance(m, TaskModel) else m
    kept = []
    if gguf is not None and method == INT4 and body.config.family == "llama":
        kept = keep_gguf_4bit(m, gguf)  # the file's own 4-bit blocks, not a second rounding
    m = quantize(m, method)
    if kept:
        body.config.hf_config["quantization_config"]["gguf_blocks"] = len(kept)
    with atomic_folder(out) as tmp:
        for file in folder.iterdir():
            if file.is_file() and file.name != "config.json" and not is_weights(file):
                shutil.copy2(file, tmp / file.name)
        save_model(m, tmp)
    return out


def is_weights(file: Path) -> bool:
    return file.name in WEIGHT_FILES or file.suffix in (
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".onnx",
    )


def size_on_disk(folder: str | Path) -> int:
    """Bytes of a checkpoint's weight files (an exported folder's graph included)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and is_weights(f))


GGUF_4BIT = (
    "gguf-q4"  # graft generate --gguf-q4: a GGUF file's Q4_0 / Q4_1 linears kept as their 4-bit blocks
)


def keep_gguf_4bit(model: Model, gguf: str | Path) -> list[str]:
    """Replace the linear layers of ``model`` (a causal LM loaded from the GGUF file ``gguf``) whose
    tensors the file stores as Q4_0 / Q4_1 by Int4Linear layers holding those blocks (in place);
    the replaced names. Other types (Q8_0, Q4_K, Q6_K, F16...) stay the float layers they were
    dequantized into, as do the embeddings and the LM head.

    ``graft quantize FILE.gguf OUT --method int4-weight`` saves them (``quantize_folder``).
    """
    from graft.io.gguf import read_4bit_blocks

    body = model.body if isinstance(model, TaskModel) else model
    if body.config.family != "llama":
        raise GraftError(
            f"{gguf}: {GGUF_4BIT} keeps the 4-bit blocks of llama GGUF files, not {body.config.family}"
        )
    names = weight_map(FAMILIES["llama"], body.config, "base").names
    replaced = []
    for hf_name, (q, d, m) in read_4bit_blocks(gguf).items():
        target = names.get(hf_name.removeprefix("model."))
        if not isinstance(target, str) or not target.endswith(".weight"):
            continue  # not a body linear (the LM head stays float: it decides the next token)
        parent_name, _, child = target.removesuffix(".weight").rpartition(".")
        parent = body.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, torch.nn.Linear) or tuple(old.weight.shape) != q.shape:
            raise GraftError(f"{gguf}: tensor {hf_name!r} does not match the model's layer {target!r}")
        q, d, m = (torch.from_numpy(a) for a in (q, d, m))
        layer = Int4Linear.from_q4_1(q, d, m, old.bias)  # (Qwen2's Q/K/V biases stay float)
        setattr(parent, child, layer)
        replaced.append(parent_name + "." + child)
    return replaced
