"""The command line: graft info / graft embed on the real all-MiniLM-L6-v2, one-line errors, global options.

Tests run main() in this process (the ``cli`` fixture); one test per command runs a real process.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model

from graft.errors import GraftError

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


def test_info_prints_family_shape_and_exact_parameter_count(minilm, cli):
    result = cli("info", minilm).ok()
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
def test_embed_equals_transformers_mean_pooling(minilm, tmp_path, normalize, cli):
    file = tmp_path / "texts.txt"
    file.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    result = cli("embed", minilm, "--file", file, *(["--normalize"] if normalize else [])).ok()
    got = np.array([json.loads(line) for line in result.stdout.splitlines()])
    expected = reference_embeddings(minilm, TEXTS, normalize)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - expected).max() <= 1e-5
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_embed_npy_to_file_equals_json_in_a_real_process(minilm, tmp_path, cli):
    out = tmp_path / "emb.npy"
    a = graft("embed", minilm, "--text", TEXTS[0], "--text", TEXTS[1], "--format", "npy", "--out", out)
    assert a.returncode == 0, a.stderr
    assert a.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask()
    b = cli("embed", minilm, "--text", TEXTS[0], "--text", TEXTS[1]).ok()
    np.testing.assert_array_equal(
        np.load(out), np.array([json.loads(x) for x in b.stdout.splitlines()], dtype=np.float32)
    )


def test_embed_npy_to_stdout_is_the_array(minilm, cli):
    result = cli("embed", minilm, "--text", TEXTS[0], "--format", "npy").ok()
    assert np.load(io.BytesIO(result.stdout_bytes)).shape == (1, 384)


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    hf_model("bert").save_pretrained(folder)
    return folder


def test_error_missing_folder(tmp_path, cli):
    line = cli("info", tmp_path / "nowhere").error_line()
    assert "nowhere" in line and "does not exist" in line


def test_error_folder_without_weights(tiny_folder, cli):
    (tiny_folder / "model.safetensors").unlink()
    line = cli("info", tiny_folder).error_line()
    assert str(tiny_folder) in line and "no weights" in line and "model.safetensors" in line


def test_error_unknown_model_type(tiny_folder, cli):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["model_type"] = "perceiver-9000"
    (tiny_folder / "config.json").write_text(json.dumps(config))
    line = cli("info", tiny_folder).error_line()
    assert "config.json" in line and "unknown model_type 'perceiver-9000'" in line and "bert" in line


def test_error_shapes_disagree_with_config(tiny_folder, cli):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (tiny_folder / "config.json").write_text(json.dumps(config))
    line = cli("info", tiny_folder).error_line()
    assert "model.safetensors" in line
    assert (
        "'encoder.layer.0.intermediate.dense.weight' has shape (37, 32) but the config implies (40, 32)"
        in line
    )


def test_error_truncated_safetensors(tiny_folder, cli):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = cli("info", tiny_folder).error_line()
    assert "model.safetensors" in line and "not a valid safetensors file" in line


def test_error_malformed_config_json(tiny_folder, cli):
    (tiny_folder / "config.json").write_text('{"model_type": "bert",\n  "hidden_size": }')
    line = cli("info", tiny_folder).error_line()
    assert "config.json" in line and "line 2" in line and "invalid JSON" in line


def test_error_embed_needs_input(minilm, cli):
    line = cli("embed", minilm).error_line()
    assert "--text" in line and "--file" in line


def test_error_embed_file_not_utf8(minilm, tmp_path, cli):
    file = tmp_path / "bad.txt"
    file.write_bytes(b"fine\nbad \xff byte\n")
    line = cli("embed", minilm, "--file", file).error_line()
    assert "bad.txt" in line and "line 2" in line and "not UTF-8" in line


def test_error_hub_id_offline(monkeypatch, cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli("info", "someone/not-cached-model").error_line()
    assert "someone/not-cached-model" in line and "HF_HUB_OFFLINE" in line


def test_cli_has_no_traceback_on_pytorch_bin_garbage(tiny_folder, cli):
    (tiny_folder / "model.safetensors").unlink()
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not a zip")
    line = cli("info", tiny_folder).error_line()
    assert "pytorch_model.bin" in line


def test_console_script_info_in_a_real_process(minilm, cli):
    """The installed ``graft`` script prints what main() prints (the embed test runs ``python -m graft``)."""
    exe = shutil.which("graft", path=str(Path(sys.executable).parent)) or shutil.which("graft")
    assert exe is not None, "the graft console script is not installed"
    done = subprocess.run([exe, "info", minilm, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli("info", minilm, "--json").ok().stdout
    assert json.loads(done.stdout)["parameters"] == 22_713_216


# ------------------------------------------------------------------------ global options and modes


def test_bare_graft_prints_the_help_and_succeeds(cli):
    result = cli().ok()
    assert "Usage: graft" in result.stdout and result.stderr == ""
    for command in ("info", "embed", "generate", "chat", "convert", "predict", "eval", "train", "demo"):
        assert command in result.stdout


def test_version_is_the_installed_distributions(cli):
    result = cli("--version").ok()
    assert result.stdout == f"graft {importlib.metadata.version('graft-ml')}\n"


def test_threads_are_set_before_the_command_works(cli, monkeypatch):
    import graft.loading

    seen = []

    def load_model(*args, **kwargs):
        seen.append((torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
        raise GraftError("stop here")

    monkeypatch.setattr(graft.loading, "load_model", load_model)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored after the test, whatever graft sets
    threads = torch.get_num_threads()
    try:
        assert cli("--threads", "1", "info", "x").error_line() == "error: stop here"
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, "1")]


def test_runs_in_one_process_do_not_stack_log_handlers(cli, tmp_path):
    handlers = list(logging.getLogger("graft").handlers)
    for _ in range(3):
        cli("info", tmp_path / "nowhere").error_line()
    assert logging.getLogger("graft").handlers == handlers


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saved_files_and_folders_get_the_modes_of_any_tools_output(tiny_folder, tmp_path):
    from graft.loading import load_model, save_model

    out = save_model(load_model(tiny_folder), tmp_path / "saved")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask(), "config.json": 0o666 & ~umask()}


def test_convert_writes_a_folder_others_can_read(cli, tmp_path):
    from test_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    assert cli("convert", gguf, out).ok().stdout == f"wrote {out}\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    files = sorted(out.iterdir())
    assert "model.safetensors" in [p.name for p in files]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {
        p.name: 0o666 & ~umask() for p in files
    }
    line = cli("convert", gguf, out).error_line()
    assert line == f"error: {out}: folder is not empty (pass --overwrite to replace it)"
    cli("convert", gguf, out, "--overwrite").ok()
