"""Import CTranslate2 models (faster-whisper's format) as Hugging Face-format checkpoints.

A CTranslate2 model is a folder: ``model.bin`` (the weights, under CTranslate2's names),
``config.json`` (generation hints: suppressed tokens, language ids, alignment heads) and
``tokenizer.json``. ``read_ctranslate2`` parses model.bin with its own reader, which checks every
count and length in the file against the bytes that remain before it reads or allocates anything;
``convert_ctranslate2`` writes a Whisper model as the folder transformers'
``WhisperForConditionalGeneration`` loads.

    graft convert faster-whisper-base/model.bin whisper-base/

model.bin, little-endian: a uint32 format version, the spec's name (a string: a uint16 length
that counts a trailing NUL, then the bytes), a uint32 spec revision, a uint32 count of variables;
each variable is a name, a uint8 rank, rank uint32 dimensions, a uint8 dtype code, a uint32 byte
count and the raw data; then a uint32 count of aliases, each an alias name and the name of the
variable it stands for.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, atomic_path, write_json
from graft.io.cursor import Cursor

VERSIONS = (4, 5, 6)  # the layout above: dtype codes and byte counts since 4, aliases since 3
# CTranslate2's DataType enum, in order
DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
MIN_VARIABLE = 9  # a 1-byte name (its NUL) with its length, rank 0, a dtype and a byte count
MIN_ALIAS = 6  # two 1-byte names with their lengths


@dataclass
class CT2Model:
    """What model.bin holds: the spec's name and revision, and the variables by name (an alias
    maps to the same tensor as the variable it names)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]  # alias -> variable name


class _Cursor(Cursor):
    """Reads model.bin front to back; every read is checked against the bytes that remain."""

    kind = "CTranslate2"

    def string(self, what: str) -> str:
        n = self.unpack("<H", what)
        self.need(n, f"{what} ({n:,}-byte string)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if not raw or raw[-1] != 0:  # the length counts a trailing NUL
            raise GraftError(f"{self.path}: {what} is not a NUL-terminated string (at offset {self.pos:,})")
        self.pos += n
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise GraftError(f"{self.path}: {what} is not UTF-8 text") from None


def ctranslate2_file(model: str | os.PathLike) -> Path | None:
    """The CTranslate2 model.bin that ``model`` names: the file itself, or a folder holding one and
    no config.json (a faster-whisper folder; with a config.json it is read as a Hugging Face
    folder); None for anything else."""
    path = Path(model)
    if path.is_dir() and (path / "model.bin").is_file() and not (path / "config.json").is_file():
        path = path / "model.bin"
    return path if path.suffix == ".bin" and path.is_file() else None


def read_ctranslate2(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 model.bin (format versions 4 to 6)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise GraftError(f"{path}: is empty, not a CTranslate2 model.bin")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except OSError as e:
        raise GraftError(f"{path}: cannot read ({e.strerror})") from None


def _parse(c: _Cursor) -> CT2Model:
    path = c.path
    version = c.unpack("<I", "the format version")
    if version not in VERSIONS:
        raise GraftError(
            f"{path}: CTranslate2 format version {version:,} is not supported ({', '.join(map(str, VERSIONS))})"
        )
    spec = c.string("the spec name")
    revision = c.unpack("<I", "the spec revision")
    count = c.unpack("<I", "the variable count")
    c.need(MIN_VARIABLE * count, f"{count:,} variables")

    variables: dict[str, torch.Tensor] = {}
    for i in range(count):
        name = c.string(f"variable #{i}'s name")
        what = f"variable {name!r}"
        if name in variables:
            raise GraftError(f"{path}: {what} appears twice")
        rank = c.unpack("<B", what)
        c.need(4 * rank, f"{what}'s {rank} dimensions")
        shape = struct.unpack_from(f"<{rank}I", c.buf, c.pos)
        c.pos += 4 * rank
        code = c.unpack("<B", what)
        if code not in DTYPES:
            raise GraftError(f"{path}: {what} has unknown dtype code {code} (known: 0-{len(DTYPES) - 1})")
        dtype = DTYPES[code]
        nbytes = c.unpack("<I", what)
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise GraftError(
                f"{path}: {what} says {nbytes:,} bytes, but {list(shape)} {str(dtype).removeprefix('torch.')}"
                f" values take {expected:,}"
            )
        c.need(nbytes, f"{what}'s data")
        raw = np.frombuffer(c.buf, np.uint8, nbytes, c.pos).copy()  # (nbytes,): off the mmap
        variables[name] = torch.from_numpy(raw).view(dtype).reshape(shape)
        c.pos += nbytes

    aliases: dict[str, str] = {}
    n_aliases = c.unpack("<I", "the alias count")
    c.need(MIN_ALIAS * n_aliases, f"{n_aliases:,} aliases")
    for i in range(n_aliases):
        alias = c.string(f"alias #{i}")
        target = c.string(f"alias {alias!r}'s variable")
        if alias in variables:
            raise GraftError(f"{path}: alias {alias!r} is also the name of a variable")
        if target not in variables:
            raise GraftError(
                f"{path}: alias {alias!r} names variable {target!r}, which the file does not hold"
            )
        aliases[alias] = target
        variables[alias] = variables[target]
    left = len(c.buf) - c.pos
    if left:
        raise GraftError(
            f"{path}: {left:,} unexpected bytes after the aliases (at offset {c.pos:,}); was the file"
            " assembled from parts in the wrong order?"
        )
    return CT2Model(spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------
# Whisper: CTranslate2's WhisperSpec -> transformers' WhisperForConditionalGeneration
# ---------------------------------------------------------------------------------------------

# per block: CTranslate2 sub-layer -> Hugging Face module (linear layers split below)
_NORMS = {"gamma": "weight", "beta": "bias"}
SAMPLING_RATE = 16000
# CTranslate2's ActivationType enum value for exact GELU, the only one HF Whisper takes
GELU = 3


def _count_layers(variables: dict[str, torch.Tensor], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


class _Whisper:
    """Takes CTranslate2's variables one by one (each must be taken once), so nothing is left
    unconverted and nothing missing goes unnoticed."""

    def __init__(self, model: CT2Model, path: Path) -> None:
        self.vars = {k: v for k, v in model.variables.items() if k not in model.aliases}
        self.aliases = model.aliases
        self.path = path
        self.out: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.vars:
            raise GraftError(f"{self.path}: variable {name!r} is missing")
        value = self.vars.pop(name)
        if shape is not None and tuple(value.shape) != shape:
            raise GraftError(
                f"{self.path}: variable {name!r} has shape {list(value.shape)}, expected {list(shape)}"
            )
        return value

    def scalar(self, name: str) -> int:
        return int(self.take(name, ()).item())

    def norm(self, ct2: str, hf: str, h: int) -> None:
        for part, hf_part in _NORMS.items():
            self.out[f"{hf}.{hf_part}"] = self.take(f"{ct2}/{part}", (h,))

    def linear(self, ct2: str, hf_names: list[str | None], h_in: int, h_out: int) -> None:
        """A CTranslate2 linear layer holding len(hf_names) projections stacked on the output axis;
        None names a key projection, which has no bias in Whisper (CTranslate2 stores zeros)."""
        n = len(hf_names)
        weight = self.take(f"{ct2}/weight", (n * h_out, h_in)).split(h_out)
        bias = self.take(f"{ct2}/bias", (n * h_out,)).split(h_out)
        module = next(n for n in hf_names if n).rsplit(".", 1)[0]  # the attention, for the key's name
        for hf, w, b in zip(hf_names, weight, bias, strict=True):
            name = hf or f"{module}.k_proj"
            self.out[f"{name}.weight"] = w
            if hf is not None:
                self.out[f"{name}.bias"] = b
            elif b.any():
                raise GraftError(
                    f"{self.path}: {ct2}/bias has a non-zero key bias, which Whisper's key projection does not have"
                )


def whisper_from_ctranslate2(model: CT2Model, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config values, HF state dict) of a CTranslate2 Whisper model."""
    if model.spec != "WhisperSpec":
        raise GraftError(
            f"{path}: holds a {model.spec!r} model; graft converts CTranslate2's WhisperSpec (Whisper)"
        )
    w = _Whisper(model, path)
    embeddings = w.take("decoder/embeddings/weight")
    if embeddings.dim() != 2:
        raise GraftError(
            f"{path}: decoder/embeddings/weight has shape {list(embeddings.shape)}, expected [vocab, width]"
        )
    vocab, h = embeddings.shape
    conv1 = w.take("encoder/conv1/weight")
    if conv1.dim() != 3 or conv1.shape[0] != h or conv1.shape[2] != 3:
        raise GraftError(
            f"{path}: encoder/conv1/weight has shape {list(conv1.shape)}, expected [{h}, mel bins, 3]"
        )
    mels = conv1.shape[1]
    source_positions = w.vars.get("encoder/position_encodings/encodings", torch.empty(0)).shape[0]
    target_positions = w.vars.get("decoder/position_encodings/encodings", torch.empty(0)).shape[0]
    ffn = w.vars.get("encoder/layer_0/ffn/linear_0/weight", torch.empty(0)).shape[0]
    layers = {stack: _count_layers(w.vars, stack) for stack in ("encoder", "decoder")}
    heads = {stack: w.scalar(f"{stack}/num_heads") for stack in ("encoder", "decoder")}
    for stack in ("encoder", "decoder"):
        if not layers[stack]:
            raise GraftError(f"{path}: variable '{stack}/layer_0/ffn/linear_0/weight' is missing")
        if heads[stack] < 1 or h % heads[stack]:
            raise GraftError(
                f"{path}: {stack}/num_heads is {heads[stack]}, which does not divide the width {h}"
            )
    for flag, wanted in (("activation", GELU), ("pre_norm", 1), ("alibi", 0), ("scale_embeddings", 0)):
        value = w.scalar(f"decoder/{flag}")
        if value != wanted:
            raise GraftError(f"{path}: decoder/{flag} is {value}; Whisper's is {wanted}")
    for name in ("alignment_heads", "alignment_layer", "start_from_zero_embedding"):  # CTranslate2's own
        w.vars.pop(f"decoder/{name}", None)
    projection = w.aliases.get("decoder/projection/weight")
    if projection != "decoder/embeddings/weight":  # transformers ties proj_out to the embeddings
        raise GraftError(
            f"{path}: decoder/projection/weight must be an alias of decoder/embeddings/weight (Whisper ties them)"
        )

    o = w.out
    e = "model.encoder"
    o[f"{e}.conv1.weight"] = conv1
    o[f"{e}.conv1.bias"] = w.take("encoder/conv1/bias", (h,))
    o[f"{e}.conv2.weight"] = w.take("encoder/conv2/weight", (h, h, 3))
    o[f"{e}.conv2.bias"] = w.take("encoder/conv2/bias", (h,))
    o[f"{e}.embed_positions.weight"] = w.take("encoder/position_encodings/encodings", (source_positions, h))
    d = "model.decoder"
    o[f"{d}.embed_tokens.weight"] = embeddings
    o[f"{d}.embed_positions.weight"] = w.take("decoder/position_encodings/encodings", (target_positions, h))
    for stack, hf in (("encoder", e), ("decoder", d)):
        w.norm(f"{stack}/layer_norm", f"{hf}.layer_norm", h)
        for i in range(layers[stack]):
            ct, m = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
            w.norm(f"{ct}/self_attention/layer_norm", f"{m}.self_attn_layer_norm", h)
            w.linear(
                f"{ct}/self_attention/linear_0",
                [f"{m}.self_attn.q_proj", None, f"{m}.self_attn.v_proj"],
                h,
                h,
            )
            w.linear(f"{ct}/self_attention/linear_1", [f"{m}.self_attn.out_proj"], h, h)
            if stack == "decoder":
                w.norm(f"{ct}/attention/layer_norm", f"{m}.encoder_attn_layer_norm", h)
                w.linear(f"{ct}/attention/linear_0", [f"{m}.encoder_attn.q_proj"], h, h)
                w.linear(f"{ct}/attention/linear_1", [None, f"{m}.encoder_attn.v_proj"], h, h)
                w.linear(f"{ct}/attention/linear_2", [f"{m}.encoder_attn.out_proj"], h, h)
            w.norm(f"{ct}/ffn/layer_norm", f"{m}.final_layer_norm", h)
            w.linear(f"{ct}/ffn/linear_0", [f"{m}.fc1"], h, ffn)
            w.linear(f"{ct}/ffn/linear_1", [f"{m}.fc2"], ffn, h)
    if w.vars:
        raise GraftError(f"{path}: unexpected variable {sorted(w.vars)[0]!r} (not part of a Whisper model)")
    config = {
        "vocab_size": vocab,
        "num_mel_bins": mels,
        "d_model": h,
        "encoder_layers": layers["encoder"],
        "decoder_layers": layers["decoder"],
        "encoder_attention_heads": heads["encoder"],
        "decoder_attention_heads": heads["decoder"],
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "max_source_positions": source_positions,
        "max_target_positions": target_positions,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
    }
    return config, o


def _special_ids(tokenizer: dict[str, Any], path: Path) -> dict[str, int]:
    """Special token -> id, from tokenizer.json's added tokens."""
    try:
        return {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    except (KeyError, TypeError):
        raise GraftError(f"{path}: has no list of added tokens (a Whisper tokenizer.json has them)") from None


def _read_json(path: Path, required: bool) -> Any:
    if not path.exists():
        if required:
            raise GraftError(f"{path}: is missing (a CTranslate2 model folder has it beside model.bin)")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraftError(f"{path}: is not valid JSON ({e})") from None


def _with_timestamps(tokenizer: dict[str, Any], vocab: int) -> dict[str, Any]:
    """tokenizer.json with Whisper's timestamp tokens <|0.00|> ... <|30.00|> added after the last
    special token when the embeddings have rows for them (CTranslate2's tokenizer.json stops before)."""
    added = tokenizer["added_tokens"]
    first = max(t["id"] for t in added) + 1
    steps = vocab - first
    if steps != 1501:  # 30 s in steps of 20 ms, both ends included
        return tokenizer
    extra = [
        dict(id=first + i, content=f"<|{i * 0.02:.2f}|>", single_word=False, lstrip=False, rstrip=False,
             normalized=False, special=False)
        for i in range(steps)
    ]  # fmt: skip
    return {**tokenizer, "added_tokens": added + extra}


def convert_ctranslate2(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a CTranslate2 Whisper model (model.bin, with config.json and tokenizer.json beside
    it) as a Hugging Face folder that ``WhisperForConditionalGeneration.from_pretrained`` and
    ``WhisperProcessor.from_pretrained`` load; built aside and swapped in whole."""
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GraftError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GraftError(f"{out_dir}: folder is not empty (pass --overwrite to replace it)")
    arch, state = whisper_from_ctranslate2(read_ctranslate2(path), path)
    tokenizer_path = path.with_name("tokenizer.json")
    tokenizer = _read_json(tokenizer_path, required=True)
    hints = _read_json(path.with_name("config.json"), required=False)
    if not isinstance(hints, dict):
        raise GraftError(f"{path.with_name('config.json')}: must be a JSON object")
    ids = _special_ids(tokenizer, tokenizer_path)
    for token in (
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|transcribe|>",
        "<|translate|>",
        "<|notimestamps|>",
    ):
        if token not in ids:
            raise GraftError(f"{tokenizer_path}: has no {token} token (a Whisper tokenizer has it)")
    eos, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    languages = {t: i for t, i in ids.items() if i in set(hints.get("lang_ids", []))}
    special = dict(decoder_start_token_id=start, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        **arch,
        **special,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    generation = {
        **special,
        "suppress_tokens": hints.get("suppress_ids", []),  # never generated (CTranslate2's suppress_ids)
        "begin_suppress_tokens": hints.get("suppress_ids_begin", []),  # not as the first token
        "max_length": arch["max_target_positions"],
        "is_multilingual": len(languages) > 1,
        "lang_to_id": languages,
        "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "forced_decoder_ids": None,
        "return_timestamps": False,
    }
    if "<|startofprev|>" in ids:
        generation["prev_sot_token_id"] = ids["<|startofprev|>"]
    if "alignment_heads" in hints:
        generation["alignment_heads"] = hints["alignment_heads"]
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": arch["num_mel_bins"],
        "sampling_rate": SAMPLING_RATE,
        "hop_length": 160,
        "chunk_length": 30,
        "n_fft": 400,
        "n_samples": 30 * SAMPLING_RATE,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 1024,
        "errors": "replace",
        "add_prefix_space": False,
    }
    with atomic_folder(out_dir) as tmp:  # the old folder or the new one, never a mix
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation)
        write_json(tmp / "preprocessor_config.json", preprocessor)
        write_json(tmp / "tokenizer.json", _with_timestamps(tokenizer, arch["vocab_size"]))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
        with atomic_path(tmp / "model.safetensors") as part:  # safetensors writes 0600
            save_file(tensors, part, metadata={"format": "pt"})
    return out_dir
