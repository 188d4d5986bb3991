"""The command line: graft info / graft embed on the real all-MiniLM-L6-v2, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, and I would watch it again tomorrow with all of my friends!",
    "Transfer learning adapts a pretrained model to a new task.",
    "Ünïcödé and emoji 🤗 survive tokenization.",
    "",
]


def graft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graft", *map(str, args)], capture_output=True, text=True)


def reference_embeddings(folder, texts: list[str], normalize: bool) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def test_info_prints_family_shape_and_exact_parameter_count(minilm):
    result = graft("info", minilm)
    assert result.returncode == 0, result.stderr
    lines = dict(
        line.split(None, 1) if " " not in line[:18].strip() else (line[:18].strip(), line[18:].strip())
        for line in result.stdout.splitlines()
    )
    assert lines["family"].strip() == "bert"
    assert lines["layers"].strip() == "6"
    assert lines["hidden size"] == "384"
    assert lines["heads"].strip() == "12"
    assert lines["vocab size"] == "30,522"
    assert lines["parameters"] == "22,713,216"


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_embed_equals_transformers_mean_pooling(minilm, tmp_path, normalize):
    file = tmp_path / "texts.txt"
    file.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    result = graft("embed", minilm, "--file", file, *(["--normalize"] if normalize else []))
    assert result.returncode == 0, result.stderr
    got = np.array([json.loads(line) for line in result.stdout.splitlines()])
    expected = reference_embeddings(minilm, TEXTS, normalize)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - expected).max() <= 1e-5
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_embed_npy_to_file_equals_json(minilm, tmp_path):
    out = tmp_path / "emb.npy"
    a = graft("embed", minilm, "--text", TEXTS[0], "--text", TEXTS[1], "--format", "npy", "--out", out)
    b = graft("embed", minilm, "--text", TEXTS[0], "--text", TEXTS[1])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == ""
    np.testing.assert_array_equal(
        np.load(out), np.array([json.loads(x) for x in b.stdout.splitlines()], dtype=np.float32)
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    hf_model("bert").save_pretrained(folder)
    return folder


def test_error_missing_folder(tmp_path):
    line = one_line_error(graft("info", tmp_path / "nowhere"))
    assert "nowhere" in line and "does not exist" in line


def test_error_folder_without_weights(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    line = one_line_error(graft("info", tiny_folder))
    assert str(tiny_folder) in line and "no weights" in line and "model.safetensors" in line


def test_error_unknown_model_type(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["model_type"] = "perceiver-9000"
    (tiny_folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(graft("info", tiny_folder))
    assert "config.json" in line and "unknown model_type 'perceiver-9000'" in line and "bert" in line


def test_error_shapes_disagree_with_config(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (tiny_folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(graft("info", tiny_folder))
    assert "model.safetensors" in line
    assert (
        "'encoder.layer.0.intermediate.dense.weight' has shape (37, 32) but the config implies (40, 32)"
        in line
    )


def test_error_truncated_safetensors(tiny_folder):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = one_line_error(graft("info", tiny_folder))
    assert "model.safetensors" in line and "not a valid safetensors file" in line


def test_error_malformed_config_json(tiny_folder):
    (tiny_folder / "config.json").write_text('{"model_type": "bert",\n  "hidden_size": }')
    line = one_line_error(graft("info", tiny_folder))
    assert "config.json" in line and "line 2" in line and "invalid JSON" in line


def test_error_embed_needs_input(minilm):
    line = one_line_error(graft("embed", minilm))
    assert "--text" in line and "--file" in line


def test_error_embed_file_not_utf8(minilm, tmp_path):
    file = tmp_path / "bad.txt"
    file.write_bytes(b"fine\nbad \xff byte\n")
    line = one_line_error(graft("embed", minilm, "--file", file))
    assert "bad.txt" in line and "line 2" in line and "not UTF-8" in line


def test_error_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = one_line_error(graft("info", "someone/not-cached-model"))
    assert "someone/not-cached-model" in line and "HF_HUB_OFFLINE" in line


def test_cli_has_no_traceback_on_pytorch_bin_garbage(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not a zip")
    line = one_line_error(graft("info", tiny_folder))
    assert "pytorch_model.bin" in line


def test_module_entry_point_matches_console_script(minilm):
    exe = shutil.which("graft", path=str(Path(sys.executable).parent)) or shutil.which("graft")
    assert exe is not None, "the graft console script is not installed"
    assert (
        subprocess.run([exe, "info", minilm, "--json"], capture_output=True, text=True).stdout
        == graft("info", minilm, "--json").stdout
    )
