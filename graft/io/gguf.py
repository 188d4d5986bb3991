"""Import llama.cpp GGUF files as Hugging Face-format Llama checkpoints.

A GGUF file holds the weights (often block-quantized), the config and the tokenizer, all under
llama.cpp's names. ``read_gguf`` turns the three back into what a Hugging Face folder holds and
``convert_gguf`` writes that folder. The ``gguf`` package only parses the file; dequantization,
the name map, the Q/K un-permutation and the tokenizer are ours.

    graft convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from graft.errors import GraftError
from graft.io.atomic import atomic_path, temporary_folder

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


def _llama_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict:
    def need(key: str) -> Any:
        if key not in meta:
            raise GraftError(f"{path}: metadata key {key!r} is missing")
        return meta[key]

    hidden, n_head = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise GraftError(f"{path}: partial rotary embeddings (llama.rope.dimension_count) are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GraftError(f"{path}: Llama 3.1-style rope scaling (tensor rope_freqs.weight) is not supported")
    vocab_size = meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, path),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if (token_id := meta.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
            config[f"{key}_token_id"] = int(token_id)
    return config


def _rope_scaling(meta: dict[str, Any], path: Path) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "linear" if "llama.rope.scale_linear" in meta else "none")
    factor = float(meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0)))
    if kind == "none" or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.get(
            "llama.rope.scaling.original_context_length", meta.get("llama.context_length", 2048)
        )
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(original)}
    raise GraftError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn)")


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


def _byte_level_bpe(meta: dict[str, Any], path: Path) -> Tokenizer:
    """GPT-2-style byte-level BPE (``tokenizer.ggml.model == 'gpt2'``)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # llama.cpp writes a few added tokens as plain text (e.g. runs of spaces); spell them the
    # way the rest of the vocabulary is spelled, in the byte alphabet
    vocab = {
        t if set(t) <= alphabet else spell.pre_tokenize_str(t)[0][0]: i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = _bpe(path, vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files carry scores, not merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (as transformers' GGUF loader does)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab), key=lambda p: (vocab[p[0]], vocab[p[1]])
        )
        ranked += [(score, a, b) for a, b in pairs]
    ranked.sort(key=lambda r: (-r[0], -len(r[1]), -len(r[2])))
    return [(a, b) for _, a, b in ranked]


def _sentencepiece_bpe(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Llama/Mistral-style SentencePiece BPE (``tokenizer.ggml.model == 'llama'``)."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    merges = merges or _merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = _bpe(
        path,
        {t: i for i, t in enumerate(tokens)},
        merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,  # characters outside the vocabulary become <0xNN> byte tokens
    )
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        "▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _tokenizer(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, dict]:
    """The tokenizer described by the file's metadata, and its tokenizer_config.json."""
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise GraftError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, path)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, path)
    else:
        raise GraftError(f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama)")

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = tokenizer.get_vocab()
    # llama.cpp matches these whole in the text, so BPE must never split them
    special = [t for t, tt in zip(tokens, types, strict=True) if tt in (UNKNOWN, CONTROL) and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, tt in zip(tokens, types, strict=True) if tt == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None else None

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        pair = single + [("$B" if t == "$A" else t) + ":1" for t in single]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {*single} - {"$A"}]
        )

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [
            t for t in special if t not in (bos, eos, token("unknown"), token("padding"))
        ],
    }
    if (template := _chat_template(meta)) is not None:
        config["chat_template"] = template
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def _chat_template(meta: dict[str, Any]) -> str | list[dict] | None:
    """``tokenizer.chat_template``, plus any named ones (``tokenizer.chat_template.<name>``)."""
    main = meta.get("tokenizer.chat_template")
    named = {k.split(".", 2)[2]: v for k, v in meta.items() if k.startswith("tokenizer.chat_template.")}
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


def _open(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    if not path.is_file():
        raise GraftError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GraftError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # gguf/numpy fail with ValueError, IndexError... on cut or damaged bytes
        size = path.stat().st_size  # the parser's own message (kept as __cause__) names no file
        raise GraftError(
            f"{path}: truncated or corrupt GGUF file ({size:,} bytes could not be parsed)"
        ) from e
    if reader.byte_order != "I":
        raise GraftError(f"{path}: big-endian GGUF files are not supported")
    return reader, meta


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a llama-architecture GGUF file: config, float32 weights in Hugging Face layout, tokenizer."""
    path = Path(path)
    reader, meta = _open(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GraftError(
            f"{path}: architecture {arch!r} is not supported (graft converts 'llama' GGUF files)"
        )
    config = _llama_config(meta, {t.name for t in reader.tensors}, path)
    tokenizer, tokenizer_config = _tokenizer(meta, path)

    state_dict = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GraftError(f"{path}: tensor {t.name!r} has no counterpart in a Hugging Face Llama model")
        if t.tensor_type not in DEQUANTIZERS:
            supported = ", ".join(q.name for q in DEQUANTIZERS)
            raise GraftError(
                f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which graft cannot "
                f"dequantize (supported: {supported})"
            )
        w = dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed(t.shape.tolist()))
        )  # ggml lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(w)

    expected = _expected_shapes(config)
    if missing := sorted(expected.keys() - state_dict.keys()):
        raise GraftError(f"{path}: {len(missing)} tensors missing, e.g. {missing[0]}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise GraftError(
                f"{path}: tensor {name} has shape {tuple(state_dict[name].shape)}, config says {shape}"
            )
    return GGUFModel(config, state_dict, tokenizer, tokenizer_config)


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a GGUF file as a Hugging Face folder that ``LlamaForCausalLM.from_pretrained`` loads.

    The folder is built next to ``out_dir`` and renamed into place, so it is never half-written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GraftError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GraftError(f"{out_dir}: folder is not empty (pass overwrite=True to replace it)")
    model = read_gguf(path)

    config = dict(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    special = {
        k: model.tokenizer_config[k]
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if k in model.tokenizer_config
    }
    special["additional_special_tokens"] = model.tokenizer_config.get("additional_special_tokens", [])
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out_dir)  # mkdtemp's 0700 would make the model unreadable to others
    try:
        _write_json(config, tmp / "config.json")
        tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict.items()}
        with atomic_path(tmp / "model.safetensors") as part:  # safetensors writes 0600
            save_file(tensors, part, metadata={"format": "pt"})
        model.tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(model.tokenizer_config, tmp / "tokenizer_config.json")
        _write_json(special, tmp / "special_tokens_map.json")
        if "eos_token_id" in generation:
            _write_json(generation, tmp / "generation_config.json")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
