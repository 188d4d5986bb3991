"""CTranslate2 import: the model.bin reader (every hostile header is a one-line error, allocating
nothing), the WhisperSpec -> transformers mapping (a tiny random Whisper written in CTranslate2's
format here comes back as the same weights and logits) and, slow, faster-whisper's whisper-base."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from graft.errors import GraftError
from graft.io.ctranslate2 import convert_ctranslate2, read_ctranslate2

CODES = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}
SPECIAL = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]  # fmt: skip


def string(s: str) -> bytes:
    raw = s.encode() + b"\0"  # the length counts the NUL
    return struct.pack("<H", len(raw)) + raw


def variable(name: str, value: np.ndarray) -> bytes:
    value = np.asarray(value)  # (ascontiguousarray would make a scalar 1-d)
    header = string(name) + struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape)
    return header + struct.pack("<BI", CODES[value.dtype.type], value.nbytes) + value.tobytes()


def model_bin(
    variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6, spec: str = "WhisperSpec"
) -> bytes:
    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 3, len(variables))
    out += b"".join(variable(k, v) for k, v in variables.items())
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases.items())
    return out


def tiny_whisper(max_source_positions: int = 12, biases: bool = True):
    import transformers as tr

    config = tr.WhisperConfig(
        vocab_size=30, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=max_source_positions,
        max_target_positions=20, decoder_start_token_id=21, pad_token_id=20, eos_token_id=20, bos_token_id=20,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tr.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases everywhere (they start at zero), so each one is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") and biases:
                p.normal_()
    return model


def to_ctranslate2(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """transformers' Whisper -> CTranslate2's variables, as CTranslate2's converter names them."""
    sd = {k: v.numpy().astype(dtype) for k, v in model.state_dict().items()}
    cfg = model.config
    h = cfg.d_model
    zeros = np.zeros(h, dtype)
    out: dict[str, np.ndarray] = {}

    def norm(ct: str, hf: str) -> None:
        out[f"{ct}/gamma"], out[f"{ct}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct: str, hf: list[str], key_first: bool = False) -> None:
        w = [sd[f"{n}.weight"] for n in hf]
        b = [sd.get(f"{n}.bias", zeros) for n in hf]
        out[f"{ct}/weight"], out[f"{ct}/bias"] = np.concatenate(w), np.concatenate(b)

    for stack in ("encoder", "decoder"):
        m = f"model.{stack}"
        norm(f"{stack}/layer_norm", f"{m}.layer_norm")
        out[f"{stack}/position_encodings/encodings"] = sd[f"{m}.embed_positions.weight"]
        out[f"{stack}/num_heads"] = np.array(cfg.encoder_attention_heads, np.int16)
        for i in range(cfg.encoder_layers):
            ct, hf = f"{stack}/layer_{i}", f"{m}.layers.{i}"
            a = f"{hf}.self_attn"
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            linear(f"{ct}/self_attention/linear_0", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"])
            linear(f"{ct}/self_attention/linear_1", [f"{a}.out_proj"])
            if stack == "decoder":
                c = f"{hf}.encoder_attn"
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                linear(f"{ct}/attention/linear_0", [f"{c}.q_proj"])
                linear(f"{ct}/attention/linear_1", [f"{c}.k_proj", f"{c}.v_proj"])
                linear(f"{ct}/attention/linear_2", [f"{c}.out_proj"])
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
            linear(f"{ct}/ffn/linear_0", [f"{hf}.fc1"])
            linear(f"{ct}/ffn/linear_1", [f"{hf}.fc2"])
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"] = sd[f"model.encoder.{conv}.weight"]
        out[f"encoder/{conv}/bias"] = sd[f"model.encoder.{conv}.bias"]
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    for flag, value in (("activation", 3), ("pre_norm", 1), ("alibi", 0), ("scale_embeddings", 0)):
        out[f"decoder/{flag}"] = np.array(value, np.int8)
    out["decoder/start_from_zero_embedding"] = np.array(0, np.int8)
    out["decoder/alignment_layer"] = np.array(-1, np.int16)
    out["decoder/alignment_heads"] = np.array(1, np.int16)
    return out


ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_folder(folder: Path, data: bytes, vocab: int = 30) -> Path:
    """model.bin with CTranslate2's config.json and a tokenizer.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    words = {chr(ord("a") + i): i for i in range(vocab - len(SPECIAL))}
    tok = Tokenizer(models.BPE(vocab=words, merges=[]))
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    hints = {
        "lang_ids": [22, 23],
        "suppress_ids": [1, 2],
        "suppress_ids_begin": [20],
        "alignment_heads": [[1, 0]],
    }
    (folder / "config.json").write_text(json.dumps(hints))
    (folder / "model.bin").write_bytes(data)
    return folder / "model.bin"


def test_reader_reads_every_dtype_and_alias(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    variables = {
        "a/f32": rng.standard_normal((3, 4)).astype(np.float32),
        "a/f16": rng.standard_normal((5,)).astype(np.float16),
        "b/i8": np.array(-3, np.int8),
        "b/i16": np.arange(6, dtype=np.int16).reshape(2, 1, 3),
        "b/i32": np.array([1 << 30, -7], np.int32),
    }
    path = tmp_path / "model.bin"
    path.write_bytes(model_bin(variables, {"c/alias": "a/f16"}, spec="TinySpec"))
    model = read_ctranslate2(path)
    assert (model.spec, model.revision, model.aliases) == ("TinySpec", 3, {"c/alias": "a/f16"})
    for name, value in variables.items():
        got = model.variables[name]
        assert got.shape == value.shape and got.numpy().dtype == value.dtype
        assert np.array_equal(got.numpy(), value)
    assert model.variables["c/alias"] is model.variables["a/f16"]


def test_whisper_round_trip(tmp_path: Path) -> None:
    """A tiny random Whisper -> CTranslate2 -> graft convert -> transformers: the same weights and logits."""
    import transformers as tr

    ref = tiny_whisper()
    path = write_folder(tmp_path / "ct2", model_bin(to_ctranslate2(ref), ALIASES))
    out = convert_ctranslate2(path, tmp_path / "hf")
    got = tr.WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert got.state_dict().keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        assert torch.equal(got.state_dict()[name], value), name
    features = torch.randn(2, 8, 24)  # (B, mel bins, 2 * max_source_positions)
    decoder_ids = torch.tensor([[21, 22, 25, 3], [21, 23, 25, 7]])
    with torch.no_grad():
        expected = ref(input_features=features, decoder_input_ids=decoder_ids).logits
        logits = got(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.equal(logits, expected)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["lang_to_id"] == {"<|en|>": 22, "<|de|>": 23}
    assert generation["task_to_id"] == {"translate": 24, "transcribe": 25}
    assert (generation["no_timestamps_token_id"], generation["suppress_tokens"]) == (29, [1, 2])
    processor = tr.WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 8
    assert processor.tokenizer.convert_tokens_to_ids("<|transcribe|>") == 25


def test_float16_weights_convert_to_float32(tmp_path: Path) -> None:
    ref = tiny_whisper()
    path = write_folder(tmp_path / "ct2", model_bin(to_ctranslate2(ref, np.float16), ALIASES))
    state = load_file(convert_ctranslate2(path, tmp_path / "hf") / "model.safetensors")
    w = state["model.encoder.layers.0.fc1.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, ref.state_dict()["model.encoder.layers.0.fc1.weight"].half().float())


# ---------------------------------------------------------------------------------------------
# Hostile and broken files: one line naming the file, nothing big allocated
# ---------------------------------------------------------------------------------------------


def header(version: int = 6, count: int = 1) -> bytes:
    return struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, count)


def one(
    name: str = "x", rank_dims: bytes = b"\x01" + struct.pack("<I", 2), code: int = 0, nbytes: int = 8
) -> bytes:
    return string(name) + rank_dims + struct.pack("<BI", code, nbytes)


GOOD = header() + one() + b"\0" * 8 + struct.pack("<I", 0)
BROKEN = {
    "empty": (b"", "is empty, not a CTranslate2 model.bin"),
    "version": (
        header(version=9) + GOOD[len(header()) :],
        "CTranslate2 format version 9 is not supported (4, 5, 6)",
    ),
    "huge count": (header(count=0xFFFFFFFF), "4,294,967,295 variables needs 38,654,705,655 bytes"),
    "huge dims": (
        header() + one(rank_dims=b"\x02" + struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF), nbytes=8),
        "variable 'x' says 8 bytes, but [4294967295, 4294967295] float32 values take",
    ),
    "huge data": (
        header() + one(nbytes=0xFFFFFFF8, rank_dims=b"\x01" + struct.pack("<I", 0x3FFFFFFE)),
        "variable 'x''s data needs 4,294,967,288 bytes",
    ),
    "huge rank": (
        header() + string("x") + b"\xff" + b"\0" * 8,
        "variable 'x''s 255 dimensions needs 1,020 bytes",
    ),
    "dtype": (header() + one(code=9), "variable 'x' has unknown dtype code 9"),
    "string": (
        header() + struct.pack("<H", 60000) + b"x" * 9,
        "variable #0's name (60,000-byte string) needs 60,000 bytes",
    ),
    "no nul": (
        header() + struct.pack("<H", 1) + b"x" * 9,
        "variable #0's name is not a NUL-terminated string",
    ),
    "truncated": (GOOD[:-3], "the alias count needs 4 bytes"),
    "twice": (header(count=2) + (one() + b"\0" * 8) * 2 + struct.pack("<I", 0), "variable 'x' appears twice"),
    "alias": (
        GOOD[:-4] + struct.pack("<I", 1) + string("y") + string("z"),
        "alias 'y' names variable 'z', which",
    ),
    "trailing": (GOOD + b"\0\0", "2 unexpected bytes after the aliases"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_are_one_line_errors(tmp_path: Path, case: str) -> None:
    data, message = BROKEN[case]
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(GraftError) as e:
            read_ctranslate2(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert message in str(e.value)
    assert peak < 1 << 20  # a hostile count or size allocated nothing


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda v, a: v.pop("encoder/conv2/bias"), "variable 'encoder/conv2/bias' is missing"),
        (
            lambda v, a: v.update({"encoder/extra": np.zeros(1, np.float32)}),
            "unexpected variable 'encoder/extra'",
        ),
        (
            lambda v, a: v.update({"decoder/activation": np.array(1, np.int8)}),
            "decoder/activation is 1; Whisper's is 3",
        ),
        (
            lambda v, a: v["decoder/layer_1/attention/linear_1/bias"].__setitem__(0, 1.0),
            "has a non-zero key bias",
        ),
        (lambda v, a: a.clear(), "must be an alias of decoder/embeddings/weight"),
        (
            lambda v, a: v.update({"encoder/layer_0/ffn/linear_1/bias": np.zeros(3, np.float32)}),
            "'encoder/layer_0/ffn/linear_1/bias' has shape [3], expected [16]",
        ),
    ],
)
def test_whisper_mapping_errors(tmp_path: Path, edit, message: str) -> None:
    variables, aliases = to_ctranslate2(tiny_whisper()), dict(ALIASES)
    edit(variables, aliases)
    path = write_folder(tmp_path / "ct2", model_bin(variables, aliases))
    with pytest.raises(GraftError, match=f"^{path}: .*") as e:
        convert_ctranslate2(path, tmp_path / "hf")
    assert message in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_other_specs_and_missing_tokenizer(tmp_path: Path) -> None:
    path = write_folder(
        tmp_path / "ct2", model_bin({"x": np.zeros(1, np.float32)}, {}, spec="TransformerSpec")
    )
    with pytest.raises(
        GraftError, match="holds a 'TransformerSpec' model; graft converts CTranslate2's WhisperSpec"
    ):
        convert_ctranslate2(path, tmp_path / "hf")
    path = write_folder(tmp_path / "ct2", model_bin(to_ctranslate2(tiny_whisper()), ALIASES))
    (tmp_path / "ct2" / "tokenizer.json").unlink()
    with pytest.raises(GraftError, match=r"tokenizer.json: is missing \(a CTranslate2 model folder has it"):
        convert_ctranslate2(path, tmp_path / "hf")


def test_cli_convert(tmp_path: Path, cli) -> None:
    path = write_folder(tmp_path / "ct2", model_bin(to_ctranslate2(tiny_whisper()), ALIASES))
    assert cli("convert", str(path), str(tmp_path / "hf")).ok().stdout.strip() == f"wrote {tmp_path / 'hf'}"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "WhisperForConditionalGeneration"
    ]
    line = cli("convert", str(path), str(tmp_path / "hf")).error_line()
    assert line == f"error: {tmp_path / 'hf'}: folder is not empty (pass --overwrite to replace it)"
    (tmp_path / "junk.bin").write_bytes(b"\x06\0\0\0\xff")
    line = cli("convert", str(tmp_path / "junk.bin"), str(tmp_path / "out")).error_line()
    assert line.startswith(f"error: {tmp_path / 'junk.bin'}: truncated or corrupt CTranslate2 file")


@pytest.mark.slow
def test_whisper_base(whisper_base_ct2: Path, whisper_base: Path) -> None:
    """faster-whisper's whisper-base loads in transformers with every weight it had (float16 -> float32)."""
    import transformers as tr

    model = tr.WhisperForConditionalGeneration.from_pretrained(whisper_base)
    assert sum(p.numel() for p in model.parameters()) == 72_593_920
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    ct2 = read_ctranslate2(whisper_base_ct2)
    v = ct2.variables["decoder/layer_3/attention/linear_1/weight"][512:]  # the cross-attention's values
    assert torch.equal(model.model.decoder.layers[3].encoder_attn.v_proj.weight, v.float())
    tokenizer = tr.WhisperTokenizerFast.from_pretrained(whisper_base)
    assert tokenizer.convert_tokens_to_ids(["<|en|>", "<|0.00|>", "<|30.00|>"]) == [50259, 50364, 51864]
