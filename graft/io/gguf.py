"""Import llama.cpp GGUF files as Hugging Face-format Llama checkpoints.

A GGUF file holds the weights (often block-quantized), the config and the tokenizer, all under
llama.cpp's names. ``read_gguf`` turns the three back into what a Hugging Face folder holds and
``convert_gguf`` writes that folder. The ``gguf`` package gives the format's constants; the parser
(which checks every count in the header against the file before reading), dequantization, the
name map, the Q/K un-permutation and the tokenizer are ours.

    graft convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, atomic_path, write_json
from graft.io.cursor import Cursor

T = GGMLQuantizationType

# ---------------------------------------------------------------------------------------------
# Dequantization. Each function takes a tensor's raw little-endian bytes (uint8, flat) and
# returns its float32 values, flat. Block layouts are ggml's (ggml-common.h); the arithmetic is
# done in ggml's order so the values are bit-identical to llama.cpp's.
# ---------------------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) values: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _dequant_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").copy()


def _dequant_f16(raw: np.ndarray) -> np.ndarray:
    return _f16(raw)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    # block of 32 (34 bytes): d f16 | q int8[32];  x = d * q
    b = raw.reshape(-1, 34)
    d = _f16(b[:, :2])  # (n, 1)
    q = b[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
    return (d * q).ravel()


def _dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    # block of 32 (18 bytes): d f16 | qs u8[16] (two 4-bit values per byte);  x = d * (q - 8)
    b = raw.reshape(-1, 18)
    d = _f16(b[:, :2])  # (n, 1)
    q = _nibbles(b[:, 2:]).astype(np.int8) - 8  # (n, 32)
    return (d * q.astype(np.float32)).ravel()


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    # block of 32 (20 bytes): d f16 | m f16 | qs u8[16];  x = d * q + m
    b = raw.reshape(-1, 20)
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # (n, 1) each
    q = _nibbles(b[:, 4:]).astype(np.float32)  # (n, 32)
    return (d * q + m).ravel()


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes into 8 six-bit scales and 8 six-bit mins, (n, 8) each.

    bytes 0-3:  low 6 bits = scales 0-3, top 2 bits = bits 4-5 of scales 4-7
    bytes 4-7:  low 6 bits = mins 0-3,   top 2 bits = bits 4-5 of mins 4-7
    bytes 8-11: low nibble = bits 0-3 of scales 4-7, high nibble = bits 0-3 of mins 4-7
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    # super-block of 256 = 8 sub-blocks of 32 (144 bytes):
    #   d f16 | dmin f16 | scales u8[12] | qs u8[128]
    # qs is 4 chunks of 32 bytes; chunk j holds sub-block 2j in its low nibbles, 2j+1 in its high.
    # x = (d * scale[j]) * q - (dmin * min[j])
    b = raw.reshape(-1, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # (n, 1) each
    scales, mins = _k4_scales(b[:, 4:16])  # (n, 8) each
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((d * scales)[..., None] * q - (dmin * mins)[..., None]).ravel()


def _dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    # super-block of 256 = 16 sub-blocks of 16 (210 bytes):
    #   ql u8[128] (low 4 bits) | qh u8[64] (high 2 bits) | scales int8[16] | d f16
    # Each half of 128 values uses 64 ql bytes (low nibbles: values 0-63, high: 64-127) and
    # 32 qh bytes (bit pairs 0-1, 2-3, 4-5, 6-7: values 0-31, 32-63, 64-95, 96-127).
    # x = (d * scale[j]) * (q - 32), value i in sub-block j = i // 16
    b = raw.reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(b[:, 208:210])  # (n, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, 2, 128)
    high = np.concatenate([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], axis=2)  # (n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16).astype(np.float32)
    return ((d * scales)[..., None] * q).ravel()


DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: _dequant_f32,
    T.F16: _dequant_f16,
    T.BF16: _dequant_bf16,
    T.Q8_0: _dequant_q8_0,
    T.Q4_0: _dequant_q4_0,
    T.Q4_1: _dequant_q4_1,
    T.Q4_K: _dequant_q4_k,
    T.Q6_K: _dequant_q6_k,
}


def dequantize(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """A tensor's data as stored in the file (any dtype and shape) -> a new flat float32 array."""
    if ggml_type not in DEQUANTIZERS:
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        raise GraftError(f"GGUF tensor type {ggml_type.name} is not supported (supported: {supported})")
    return DEQUANTIZERS[ggml_type](np.ascontiguousarray(data).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# The file. gguf's GGUFReader trusts the header: an array that claims 2^40 entries makes it loop
# on empty reads until memory runs out. Here every count and length is checked against the
# bytes left in the file before anything is read or allocated, so what a file can make graft
# allocate is bounded by its size.
# ---------------------------------------------------------------------------------------------

V = GGUFValueType
NUMBERS = {  # GGUF value type -> numpy dtype (little-endian)
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
    V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT32: "<f4", V.FLOAT64: "<f8", V.BOOL: "<u1",
}  # fmt: skip
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes are, and what they hold."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, outermost first (the file lists dims innermost first)
    offset: int  # from the start of the file
    nbytes: int


class _Cursor(Cursor):
    """Reads a GGUF header front to back; every read is checked against the bytes that remain."""

    kind = "GGUF"

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, f"{what} ({n:,}-byte string)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GraftError(f"{self.path}: {what} is not UTF-8 text") from None

    def value(self, value_type: int, what: str) -> Any:
        """One metadata value: a Python scalar or str, a list of str, or a numpy array of numbers."""
        if value_type == V.STRING:
            return self.string(what)
        if value_type in NUMBERS.keys():
            dtype = np.dtype(NUMBERS[V(value_type)])
            self.need(dtype.itemsize, what)
            value = np.frombuffer(self.buf, dtype, 1, self.pos)[0].item()
            self.pos += dtype.itemsize
            return bool(value) if value_type == V.BOOL else value
        if value_type == V.ARRAY:
            item_type = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if item_type == V.ARRAY:  # llama.cpp reads none either
                raise GraftError(f"{self.path}: {what} is an array of arrays, which is not supported")
            if item_type == V.STRING:  # each string is at least its 8-byte length
                self.need(8 * count, f"{what} (an array of {count:,} strings)")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if item_type not in NUMBERS.keys():
                raise GraftError(f"{self.path}: {what} is an array of unknown value type {item_type}")
            dtype = np.dtype(NUMBERS[V(item_type)])
            self.need(dtype.itemsize * count, f"{what} (an array of {count:,} {V(item_type).name})")
            array = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += dtype.itemsize * count
            return array.astype(bool) if item_type == V.BOOL else array
        raise GraftError(f"{self.path}: {what} has unknown value type {value_type}")


def _parse(path: Path, buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """The metadata and the tensor table of a GGUF file (version 2 or 3, little-endian)."""
    c = _Cursor(buf, path)
    c.need(4, "the magic number")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version and not version & 0xFFFF:  # the version reads as 2 << 16 or 3 << 16
        raise GraftError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GraftError(f"{path}: GGUF version {version} is not supported (2, 3)")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_keys = c.unpack("<Q", "the metadata count")
    # the smallest entries: a key of 1 byte, its type and a 1-byte value; a tensor named by 1
    # byte with no dimensions (length, name, dims count, type, offset)
    c.need(14 * n_keys + 25 * n_tensors, f"{n_keys:,} metadata keys and {n_tensors:,} tensors")

    meta: dict[str, Any] = {}
    for i in range(n_keys):
        key = c.string(f"metadata key #{i}")
        if key in meta:
            raise GraftError(f"{path}: metadata key {key!r} appears twice")
        meta[key] = c.value(c.unpack("<I", f"metadata key {key!r}"), f"metadata key {key!r}")

    table: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]] = []
    for i in range(n_tensors):
        name = c.string(f"tensor #{i}'s name")
        what = f"tensor {name!r}"
        n_dims = c.unpack("<I", what)
        if n_dims > MAX_DIMS:
            raise GraftError(f"{path}: {what} has {n_dims:,} dimensions (ggml allows at most {MAX_DIMS})")
        dims = [c.unpack("<Q", what) for _ in range(n_dims)]
        raw_type = c.unpack("<I", what)
        if raw_type not in GGMLQuantizationType._value2member_map_:
            raise GraftError(f"{path}: {what} has unknown tensor type {raw_type}")
        table.append((name, GGMLQuantizationType(raw_type), tuple(reversed(dims)), c.unpack("<Q", what)))

    alignment = meta.get("general.alignment", 32)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise GraftError(f"{path}: general.alignment is {_describe(alignment)}, not a power of two")
    start = -(-c.pos // alignment) * alignment  # tensor data begins at the next aligned offset

    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, shape, offset in table:
        if name in tensors:
            raise GraftError(f"{path}: tensor {name!r} appears twice")
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if shape and shape[-1] % block:
            raise GraftError(
                f"{path}: tensor {name!r} has rows of {shape[-1]:,} values, not a multiple of "
                f"{ggml_type.name}'s block of {block}"
            )
        nbytes = math.prod(shape) // block * block_bytes
        if start + offset + nbytes > len(buf):
            raise GraftError(
                f"{path}: truncated or corrupt GGUF file: tensor {name!r} ({nbytes:,} bytes at offset "
                f"{start + offset:,}) ends beyond the end of the file ({len(buf):,} bytes)"
            )
        tensors[name] = TensorInfo(name, ggml_type, shape, start + offset, nbytes)
    return meta, tensors


_REQUIRED = object()  # no default: the key must be in the file


class _Metadata:
    """Typed access to a file's metadata: a missing key or a value of the wrong kind is a GraftError
    naming the key and the file."""

    def __init__(self, values: dict[str, Any], path: Path) -> None:
        self.values, self.path = values, path

    def _get(self, key: str, default: Any, ok: Callable[[Any], bool], kind: str) -> Any:
        if key not in self.values:
            if default is _REQUIRED:
                raise GraftError(f"{self.path}: metadata key {key!r} is missing")
            return default
        value = self.values[key]
        if not ok(value):
            raise GraftError(f"{self.path}: metadata key {key!r} should be {kind}, found {_describe(value)}")
        return value

    def count(self, key: str, default: Any = _REQUIRED) -> int:
        """A positive integer: a size, a number of heads or blocks."""
        return self._get(key, default, lambda v: _is_int(v) and v >= 1, "a positive integer")

    def number(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> float:
        def ok(v: Any) -> bool:
            return (
                (_is_int(v) or isinstance(v, float))
                and math.isfinite(v)
                and (v > 0 or not positive and v >= 0)
            )

        return float(self._get(key, default, ok, "a positive number" if positive else "a number >= 0"))

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        return self._get(key, default, lambda v: isinstance(v, str), "text")

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        return self._get(key, default, lambda v: isinstance(v, bool), "true or false")

    def texts(self, key: str, default: Any = _REQUIRED) -> list[str]:
        return self._get(key, default, lambda v: isinstance(v, list), "an array of strings")

    def numbers(self, key: str, length: int, default: Any = _REQUIRED) -> list:
        """An array of ``length`` numbers, as a list."""
        value = self._get(
            key, default, lambda v: isinstance(v, np.ndarray) and v.dtype.kind in "iuf", "an array of numbers"
        )
        if key not in self.values:
            return value
        if len(value) != length:
            raise GraftError(
                f"{self.path}: metadata key {key!r} has {len(value):,} entries, one per token ({length:,}) expected"
            )
        return value.tolist()

    def token_id(self, key: str, n_tokens: int) -> int | None:
        value = self._get(key, None, lambda v: _is_int(v) and v >= 0, "a token id")
        if value is not None and value >= n_tokens:
            raise GraftError(
                f"{self.path}: metadata key {key!r} is {value:,}, but the vocabulary has {n_tokens:,} tokens"
            )
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"an array of {len(value):,} strings"
    if isinstance(value, np.ndarray):
        return f"an array of {len(value):,} {value.dtype.name} values"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Weights: llama.cpp names -> Hugging Face Llama names and layout
# ---------------------------------------------------------------------------------------------

LLAMA_WEIGHT_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if m := re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name):
        template = LLAMA_WEIGHT_MAP.get(f"blk.{{}}.{m[2]}")
        return template.format(m[1]) if template else None
    return LLAMA_WEIGHT_MAP.get(gguf_name)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of attn_q / attn_k rows.

    llama.cpp stores each head's rows as (head_dim/2, 2), interleaving the two rotary halves for its
    rotate-pairs kernel; Hugging Face keeps them as (2, head_dim/2), rotating halves.
    """
    out_features, in_features = w.shape
    return w.reshape(n_head, out_features // n_head // 2, 2, in_features).swapaxes(1, 2).reshape(w.shape)


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, v, ff = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_dim, h),
            p + "self_attn.k_proj.weight": (kv_dim, h),
            p + "self_attn.v_proj.weight": (kv_dim, h),
            p + "self_attn.o_proj.weight": (h, q_dim),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        }
    return shapes


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _llama_config(m: _Metadata, tensors: dict[str, TensorInfo]) -> dict:
    """config.json from the llama.* keys, each checked: counts are positive integers, the heads
    divide the hidden size, the kv heads divide the heads, the block count fits the tensors."""
    path = m.path
    hidden, n_head = m.count("llama.embedding_length"), m.count("llama.attention.head_count")
    n_kv = m.count("llama.attention.head_count_kv", n_head)
    head_key = "llama.attention.key_length"
    if head_key in m.values:
        head_dim = m.count(head_key)
    elif hidden % n_head:
        raise GraftError(
            f"{path}: llama.embedding_length {hidden} is not divisible by llama.attention.head_count {n_head}"
        )
    else:
        head_dim, head_key = hidden // n_head, "llama.embedding_length / llama.attention.head_count"
    if n_head % n_kv:
        raise GraftError(
            f"{path}: llama.attention.head_count {n_head} is not a multiple of "
            f"llama.attention.head_count_kv {n_kv}"
        )
    if head_dim % 2:  # rotary embeddings turn pairs of values
        raise GraftError(f"{path}: the head size {head_dim} ({head_key}) is odd")
    if m.count("llama.attention.value_length", head_dim) != head_dim:
        raise GraftError(f"{path}: llama.attention.value_length differs from the key length: not supported")
    if m.count("llama.rope.dimension_count", head_dim) != head_dim:
        raise GraftError(f"{path}: partial rotary embeddings (llama.rope.dimension_count) are not supported")
    if "rope_freqs.weight" in tensors:
        raise GraftError(f"{path}: Llama 3.1-style rope scaling (tensor rope_freqs.weight) is not supported")
    layers = m.count("llama.block_count")
    if 9 * layers > len(tensors):  # checked before a table of every block's tensors is built
        raise GraftError(
            f"{path}: llama.block_count is {layers:,}, but the file holds {len(tensors):,} tensors "
            "(a llama block has 9)"
        )
    tokens = m.values.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else 0
    vocab_size = m.count("llama.vocab_size", n_tokens or _REQUIRED)
    if n_tokens > vocab_size:
        raise GraftError(
            f"{path}: tokenizer.ggml.tokens holds {n_tokens:,} tokens, more than llama.vocab_size ({vocab_size:,})"
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": m.count("llama.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.count("llama.context_length", 2048),
        "rms_norm_eps": m.number("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m.number("llama.rope.freq_base", 10000.0, positive=True),
        "rope_scaling": _rope_scaling(m),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if (token_id := m.token_id(f"tokenizer.ggml.{gguf_key}_token_id", n_tokens)) is not None:
            config[f"{key}_token_id"] = token_id
    return config


def _rope_scaling(m: _Metadata) -> dict | None:
    linear = "llama.rope.scale_linear" in m.values
    kind = m.text("llama.rope.scaling.type", "linear" if linear else "none")
    factor = m.number(
        "llama.rope.scaling.factor", m.number("llama.rope.scale_linear", 1.0, positive=True), positive=True
    )
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = m.count(
            "llama.rope.scaling.original_context_length", m.count("llama.context_length", 2048)
        )
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GraftError(f"{m.path}: rope scaling type {kind!r} is not supported (linear, yarn)")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# llama.cpp's token types (tokenizer.ggml.token_type)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe(path: Path, vocab: dict[str, int], merges: list, **options: Any) -> Tokenizer:
    try:
        return Tokenizer(models.BPE(vocab, merges, **options))
    except Exception as e:  # e.g. a merge naming a token that is not in the vocabulary
        raise GraftError(f"{path}: inconsistent tokenizer metadata ({e})") from e


def _byte_level_pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """How llama.cpp splits text before BPE, by ``tokenizer.ggml.pre``."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return gpt2
    if pre in ("smollm", "starcoder", "refact"):  # each digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise GraftError(
        f"{path}: tokenizer pre-type {pre!r} is not supported (default, smollm, starcoder, refact, llama-bpe)"
    )


def _merges(m: _Metadata) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges``: "left right" strings."""
    merges = []
    for i, merge in enumerate(m.texts("tokenizer.ggml.merges", [])):
        left, space, right = merge.partition(" ")
        if not space:
            raise GraftError(
                f"{m.path}: tokenizer.ggml.merges[{i}] is {_describe(merge)}, not two tokens and a space"
            )
        merges.append((left, right))
    return merges


def _byte_level_bpe(m: _Metadata, tokens: list[str]) -> Tokenizer:
    """GPT-2-style byte-level BPE (``tokenizer.ggml.model == 'gpt2'``)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # llama.cpp writes a few added tokens as plain text (e.g. runs of spaces); spell them the
    # way the rest of the vocabulary is spelled, in the byte alphabet
    vocab = {t if set(t) <= alphabet else spell.pre_tokenize_str(t)[0][0]: i for i, t in enumerate(tokens)}
    pre = m.text("tokenizer.ggml.pre", "default")
    ignore_merges = pre in ("llama-bpe", "llama3", "llama-v3")
    tokenizer = _bpe(m.path, vocab, _merges(m), ignore_merges=ignore_merges)
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre, m.path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files carry scores, not merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (as transformers' GGUF loader does).

    Only the split points where both halves have the length of some vocabulary token are tried,
    and candidates are kept as token ids. Slicing a token at every point instead costs memory
    quadratic in its length (3.8 GB for one 60,000-character token); this way the splits tried
    number at most the characters of the vocabulary, and the memory kept is one entry per merge.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    lengths = sorted({len(t) for t in vocab})
    has_length = set(lengths)
    ranked = []  # (score, left id, right id)
    for token, score in zip(tokens, scores, strict=True):
        n, pairs = len(token), []
        for k in lengths:
            if k >= n:
                break
            if n - k in has_length and (a := vocab.get(token[:k])) is not None:
                if (b := vocab.get(token[k:])) is not None:
                    pairs.append((a, b))
        ranked += [(score, a, b) for a, b in sorted(pairs)]
    ranked.sort(key=lambda r: (-r[0], -len(tokens[r[1]]), -len(tokens[r[2]])))
    return [(tokens[a], tokens[b]) for _, a, b in ranked]


def _sentencepiece_bpe(m: _Metadata, tokens: list[str]) -> Tokenizer:
    """Llama/Mistral-style SentencePiece BPE (``tokenizer.ggml.model == 'llama'``)."""
    merges = _merges(m) or _merges_from_scores(tokens, m.numbers("tokenizer.ggml.scores", len(tokens)))
    unk_id = m.token_id("tokenizer.ggml.unknown_token_id", len(tokens))
    tokenizer = _bpe(
        m.path,
        {t: i for i, t in enumerate(tokens)},
        merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,  # characters outside the vocabulary become <0xNN> byte tokens
    )
    prefix = m.flag("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        "▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _tokenizer(m: _Metadata) -> tuple[Tokenizer, dict]:
    """The tokenizer described by the file's metadata, and its tokenizer_config.json."""
    path = m.path
    if "tokenizer.ggml.tokens" not in m.values:
        raise GraftError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
    tokens = m.texts("tokenizer.ggml.tokens")
    kind = m.text("tokenizer.ggml.model", None)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(m, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(m, tokens)
    else:
        raise GraftError(f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama)")

    types = m.numbers("tokenizer.ggml.token_type", len(tokens), None) or [1] * len(tokens)
    vocab = tokenizer.get_vocab()
    # llama.cpp matches these whole in the text, so BPE must never split them
    special = [t for t, tt in zip(tokens, types, strict=True) if tt in (UNKNOWN, CONTROL) and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, tt in zip(tokens, types, strict=True) if tt == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        token_id = m.token_id(f"tokenizer.ggml.{key}_token_id", len(tokens))
        return tokens[token_id] if token_id is not None else None

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    add_bos = m.flag("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None
    add_eos = m.flag("tokenizer.ggml.add_eos_token", False) and eos is not None
    if add_bos or add_eos:
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        pair = single + [("$B" if t == "$A" else t) + ":1" for t in single]
        try:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {*single} - {"$A"}]
            )
        except Exception as e:  # a BOS/EOS token the vocabulary spells otherwise, or "$A"
            raise GraftError(f"{path}: inconsistent tokenizer metadata (BOS/EOS token {e})") from None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": m.count("llama.context_length", 2048),
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [
            t for t in special if t not in (bos, eos, token("unknown"), token("padding"))
        ],
    }
    if (template := _chat_template(m)) is not None:
        config["chat_template"] = template
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def _chat_template(m: _Metadata) -> str | list[dict] | None:
    """``tokenizer.chat_template``, plus any named ones (``tokenizer.chat_template.<name>``)."""
    main = m.text("tokenizer.chat_template", None)
    prefix = "tokenizer.chat_template."
    named = {k.removeprefix(prefix): m.text(k) for k in m.values if k.startswith(prefix)}
    if not named:
        return main
    default = [{"name": "default", "template": main}] if main else []
    return default + [{"name": name, "template": t} for name, t in named.items()]


# ---------------------------------------------------------------------------------------------
# Reading and converting
# ---------------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """Everything a Hugging Face Llama folder holds, read from one GGUF file."""

    config: dict  # LlamaConfig-style config.json
    state_dict: dict[str, torch.Tensor]  # Hugging Face names and layout, float32
    tokenizer: Tokenizer
    tokenizer_config: dict  # tokenizer_config.json, with the chat template


def _open(path: Path) -> mmap.mmap:
    """The file, mapped: tensors are read in place, and only the header is parsed up front."""
    if not path.is_file():
        raise GraftError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise GraftError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GraftError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a llama-architecture GGUF file: config, float32 weights in Hugging Face layout, tokenizer.

    Everything is checked before a tensor is read: the header against the file's size, the
    metadata's types and values, every tensor's name and shape against the config.
    """
    path = Path(path)
    buf = _open(path)
    meta, tensors = _parse(path, buf)
    m = _Metadata(meta, path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch != "llama":
        raise GraftError(
            f"{path}: architecture {_describe(arch)} is not supported (graft converts 'llama' GGUF files)"
        )
    config = _llama_config(m, tensors)
    tokenizer, tokenizer_config = _tokenizer(m)

    expected = _expected_shapes(config)
    found: dict[str, TensorInfo] = {}
    for t in tensors.values():
        name = _hf_name(t.name)
        if name is None:
            raise GraftError(f"{path}: tensor {t.name!r} has no counterpart in a Hugging Face Llama model")
        if name not in expected:
            raise GraftError(
                f"{path}: tensor {t.name!r} is beyond the model's {config['num_hidden_layers']} blocks "
                "(llama.block_count)"
            )
        if t.ggml_type not in DEQUANTIZERS:
            supported = ", ".join(q.name for q in DEQUANTIZERS)
            raise GraftError(
                f"{path}: tensor {t.name!r} is stored as {t.ggml_type.name}, which graft cannot "
                f"dequantize (supported: {supported})"
            )
        if t.shape != expected[name]:
            raise GraftError(
                f"{path}: tensor {t.name!r} has shape {t.shape}, but the metadata implies {expected[name]}"
            )
        found[name] = t
    if missing := sorted(expected.keys() - found.keys()):
        raise GraftError(f"{path}: {len(missing)} tensors missing, e.g. {missing[0]}")

    state_dict = {}
    for name, t in found.items():
        w = dequantize(np.frombuffer(buf, np.uint8, t.nbytes, t.offset), t.ggml_type).reshape(t.shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(w)
    return GGUFModel(config, state_dict, tokenizer, tokenizer_config)


# 4-bit types whose blocks graft.kernels.int4 keeps as they are: (block bytes, has a minimum)
FOUR_BIT = {T.Q4_0: (18, False), T.Q4_1: (20, True)}


def read_4bit_blocks(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The Q4_0 / Q4_1 matrices of a llama GGUF file as they are stored, by Hugging Face name:
    codes (out, in) uint8 in 0..15, scales d and minimums m (out, in / 32) fp32, w = d * q + m
    (Q4_0: m = -8d). attn_q / attn_k rows are reordered as ``read_gguf`` reorders them; other
    types are left out (``read_gguf`` dequantizes them). The file is checked as ``read_gguf`` checks it.
    """
    model = read_gguf(path)  # every check (header against size, names, shapes, metadata)
    buf = _open(Path(path))
    _, tensors = _parse(Path(path), buf)
    heads = {
        "attn_q.weight": model.config["num_attention_heads"],
        "attn_k.weight": model.config["num_key_value_heads"],
    }
    blocks = {}
    for t in tensors.values():
        if t.ggml_type not in FOUR_BIT:
            continue
        size, has_min = FOUR_BIT[t.ggml_type]
        out_features, in_features = t.shape
        b = np.frombuffer(buf, np.uint8, t.nbytes, t.offset).reshape(out_features * in_features // 32, size)
        d = _f16(b[:, 0:2])  # (n, 1)
        m = _f16(b[:, 2:4]) if has_min else -8 * d  # (n, 1)
        q = _nibbles(b[:, size - 16 :])  # (n, 32)
        q, d, m = (
            q.reshape(out_features, in_features),
            d.reshape(out_features, -1),
            m.reshape(out_features, -1),
        )
        if n_head := next((h for k, h in heads.items() if t.name.endswith(k)), None):
            q, d, m = (_unpermute(a, n_head) for a in (q, d, m))
        blocks[_hf_name(t.name)] = (np.ascontiguousarray(q), np.ascontiguousarray(d), np.ascontiguousarray(m))
    return blocks


def convert_gguf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a GGUF file as a Hugging Face folder that ``LlamaForCausalLM.from_pretrained`` loads.

    The folder is built next to ``out_dir`` and swapped in as a whole, so it is never half-written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GraftError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GraftError(
            f"{out_dir}: folder is not empty (pass --overwrite, or overwrite=True in Python, to replace it)"
        )
    model = read_gguf(path)

    config = dict(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    special = {
        k: model.tokenizer_config[k]
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if k in model.tokenizer_config
    }
    special["additional_special_tokens"] = model.tokenizer_config.get("additional_special_tokens", [])
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}

    with atomic_folder(out_dir) as tmp:  # the old folder or the new one, never a mix
        write_json(tmp / "config.json", config)
        tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict.items()}
        with atomic_path(tmp / "model.safetensors") as part:  # safetensors writes 0600
            save_file(tensors, part, metadata={"format": "pt"})
        model.tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", model.tokenizer_config)
        write_json(tmp / "special_tokens_map.json", special)
        if "eos_token_id" in generation:
            write_json(tmp / "generation_config.json", generation)
    return out_dir
