"""Quantization in torch (chapter 8): a float checkpoint -> an int8 or bf16 one that graft loads back.

Methods (graft.kernels.int8.METHODS):

- ``int8-dynamic``: the linear layers of every block hold int8 weights with one scale per output
  channel, and quantize their input per row (token) at run time: int8 x int8 products on oneDNN
  (a decoder's attention output projection keeps float inputs: see graft.loading.quantized).
- ``int8-weight``: the same int8 weights; activations stay float (decoding reads a quarter of
  the bytes; many rows dequantize the weight per call).
- ``bf16``: every weight in bfloat16.

Every stack is quantized: an encoder-decoder's two (T5, BART, Whisper: cross-attention and the
context projection included) and CLIP's two towers (its projections into the shared space stay
float, as a pooler). The token embeddings become int8 too (one scale per token; they are half of
MiniLM's bytes), one table where two stacks share it.
What stays float, and why: the position embeddings and layer norms (few numbers, and
sensitive), BERT's pooler and every task head, the LM head included (it decides the next token),
and with it the token embeddings of a decoder whose LM head shares them (SmolLM2, GPT-2, T5, BART). The saved
config.json says so under "quantization_config" (quant_method "graft", so transformers does not
mistake it for a format it reads). Weights go into model.safetensors as int8 ("X.weight") next to
fp32 scales ("X.weight_scale"), written atomically; ``graft.loading.load_model`` reads them back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError, did_you_mean
from graft.io.atomic import atomic_folder, check_output
from graft.io.hf import WEIGHT_FILES, resolve
from graft.kernels.int8 import METHODS, Int8Embedding, Int8Linear
from graft.loading import (
    DYNAMIC_FLOAT_INPUTS,
    Model,
    load_config,
    load_model,
    quantization,
    quantized,
    save_model,
)
from graft.models import FAMILIES
from graft.tasks import TaskModel

FLOAT = (
    "position embeddings, layer norms, pooler (and CLIP's projections), task head (LM head included; "
    "token embeddings too when tied to it)"
)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise GraftError(
            f"--method: unknown method {method!r} (known: {', '.join(METHODS)}){did_you_mean(method, METHODS)}"
        )
    return method


def quantization_config(method: str, layers: list[str], decoder: bool) -> dict[str, Any]:
    """What config.json says about a model quantized with ``method``: loading reads "method"."""
    config: dict[str, Any] = {"quant_method": "graft", "method": method}
    if METHODS[method] is None:
        config["weights"] = "bfloat16"
        return config
    config["weights"] = "int8, symmetric, one fp32 scale per output channel (X.weight_scale)"
    config["activations"] = "int8 per row at run time" if METHODS[method] == "dynamic" else "float"
    floats = [n for n in layers if n.endswith(DYNAMIC_FLOAT_INPUTS)]
    if METHODS[method] == "dynamic" and decoder and floats:
        config["float_activations"] = (
            f"{len(floats)} layers ({DYNAMIC_FLOAT_INPUTS[0].lstrip('.')}: outliers)"
        )
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
    if METHODS[method] is None:
        model.to(torch.bfloat16)
        layers: list[str] = []
    else:
        quantized(body, method)
        layers = [n for n, m in body.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    decoder = FAMILIES[body.config.family].decoder
    body.config.hf_config["quantization_config"] = quantization_config(method, layers, decoder)
    return model


def quantize_folder(model: str | Path, out: str | Path, method: str, overwrite: bool = False) -> Path:
    """Quantize a checkpoint folder (or Hub id) into ``out``: config.json, model.safetensors and the
    source's other files (tokenizer, generation config) copied as they are; the folder is
    written whole or not at all."""
    check_method(method)
    out = check_output(out, "OUT", folder=True, overwrite=overwrite)
    folder = resolve(model)
    before = quantization(load_config(folder)[1].hf_config)  # (a bad config.json: its path in the line)
    if before is not None:
        raise GraftError(f"{folder}: already quantized ({before}); quantize the float model it came from")
    m = quantize(load_model(folder, kernels=False), method)
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


GGUF_4BIT = "gguf-q4"  # load-time only: a GGUF file's Q4_0 / Q4_1 linears kept as their 4-bit blocks


def keep_gguf_4bit(model: Model, gguf: str | Path) -> list[str]:
    """Replace the linear layers of ``model`` (a causal LM loaded from the GGUF file ``gguf``) whose
    tensors the file stores as Q4_0 / Q4_1 by Int4Linear layers holding those blocks (in place);
    the replaced names. Other types (Q8_0, Q4_K, Q6_K, F16...) stay the float layers they were
    dequantized into, as do the embeddings and the LM head.

    Load-time only: ``save_model`` does not write these layers (keep the GGUF file).
    """
    from graft.io.gguf import read_4bit_blocks
    from graft.kernels.int4 import Int4Linear
    from graft.loading import weight_map

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
        if not isinstance(old, torch.nn.Linear) or old.bias is not None or tuple(old.weight.shape) != q.shape:
            raise GraftError(f"{gguf}: tensor {hf_name!r} does not match the model's layer {target!r}")
        layer = Int4Linear.from_q4_1(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))
        setattr(parent, child, layer)
        replaced.append(parent_name + "." + child)
    return replaced
