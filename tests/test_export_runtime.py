"""An exported ONNX folder runs with only onnxruntime, tokenizers and numpy: a fresh virtual
environment (no torch, no graft) runs OUT/runtime.py and gets graft's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from test_export_decoder import graft_tokens
from test_predict_cli import LABELS, task_folder, write_jsonl

from graft.export import export_model
from graft.loading import load_model
from graft.tokenizer import Tokenizer

TEXTS = ["A fine film, truly.", "Dull.", "Nothing happens for two hours and then it ends."]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv with only onnxruntime, tokenizers and numpy (from the package index pip is set up with)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "onnxruntime", "tokenizers", "numpy"],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0  # nothing of torch or graft in there
    return python


def runtime(python, out, *args) -> list[dict]:
    result = subprocess.run(
        [str(python), "-I", str(out / "runtime.py"), str(out), *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow
def test_runtime_py_in_a_bare_venv_classifies_as_graft(bare_python, tmp_path, minilm, cli):
    model = load_model(minilm, task="classification", id2label=LABELS, kernels=False)
    torch.manual_seed(0)
    with torch.no_grad():  # a classifier head that tells the texts apart
        model.head.out.weight.normal_(std=2.0)
    out = tmp_path / "out"
    export_model(model, out, Tokenizer.from_folder(minilm))
    got = runtime(bare_python, out, *TEXTS)

    folder = tmp_path / "graft"
    from graft.loading import save_model

    save_model(model, folder, Tokenizer.from_folder(minilm))
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    want = [json.loads(line) for line in cli("predict", folder, "--input", data).ok().stdout.splitlines()]
    assert [g["text"] for g in got] == TEXTS
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want, strict=True)) <= 1e-4


@pytest.mark.slow
def test_runtime_py_in_a_bare_venv_generates_graft_tokens(bare_python, tmp_path, minilm):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama")
    model = load_model(folder, kernels=False)
    tokenizer = Tokenizer.from_folder(folder)
    out = tmp_path / "out"
    export_model(model, out, tokenizer)
    prompts = ["The capital of France is", "Once"]
    got = runtime(bare_python, out, "--generate", 12, *prompts)
    ids = [
        tokenizer.encode(p, truncation=False, padding=False, return_tensors=None).input_ids[0]
        for p in prompts
    ]
    eos = model.config.hf_config.get("eos_token_id")  # runtime.py stops a row at config.json's end token
    want = graft_tokens(model, ids, 12, [eos] if isinstance(eos, int) else eos)
    assert [g["tokens"] for g in got] == want and max(len(row) for row in want) > 1
