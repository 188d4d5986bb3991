"""The runtime switch: graft predict / eval / embed / generate on an exported folder (auto-detected
from its manifest.json, or --backend) give the torch path's JSON on the same inputs."""

from __future__ import annotations

import json

import pytest
import transformers
from test_predict_cli import LABELS, TAGS, task_folder, write_jsonl

TOL = 1e-4
TEXTS = ["A fine film, truly.", "Dull.", "Nothing happens for two hours and then it ends."]
FORMATS = {"onnx": "onnx", "torchscript": "torchscript", "exported-program": "torchscript"}  # -> --backend


def same_json(got: list[dict], want: list[dict]) -> None:
    """Equal JSON rows: strings and ints exactly, floats within TOL."""
    assert len(got) == len(want)

    def close(a, b, where):
        if isinstance(b, float):
            assert isinstance(a, float) and abs(a - b) <= TOL, where
        elif isinstance(b, dict):
            assert a.keys() == b.keys(), where
            for k in b:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(b, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                close(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        close(a, b, f"row {i}")


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.ok().stdout.splitlines()]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_predict_and_eval_on_an_exported_classifier_equal_the_torch_path(fmt, tmp_path, minilm, cli):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    out = tmp_path / "out"
    cli("export", folder, out, "--format", fmt).ok()
    data = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "text": t, "label": LABELS[i % 2]} for i, t in enumerate(TEXTS)],
    )
    want = lines(cli("predict", folder, "--input", data))
    same_json(lines(cli("predict", out, "--input", data)), want)  # auto-detected
    same_json(lines(cli("predict", out, "--input", data, "--backend", FORMATS[fmt])), want)
    same_json(lines(cli("eval", out, "--data", data)), lines(cli("eval", folder, "--data", data)))
    other = "torchscript" if fmt == "onnx" else "onnx"
    assert cli("predict", out, "--input", data, "--backend", other).error_line() == (
        f"error: --backend {other}: {out} holds a {fmt} export (drop --backend to run it as exported)"
    )


def test_predict_on_an_exported_tagger_equals_the_torch_path(tmp_path, minilm, cli):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForTokenClassification, id2label=dict(enumerate(TAGS))
    )
    cli("export", folder, tmp_path / "out").ok()
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    want = lines(cli("predict", folder, "--input", data))
    same_json(lines(cli("predict", tmp_path / "out", "--input", data)), want)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_embed_from_an_exported_minilm_equals_the_torch_path(fmt, tmp_path, minilm, cli):
    out = tmp_path / "out"
    cli("export", minilm, out, "--format", fmt).ok()  # the bare body: graft embed mean-pools it
    args = [a for t in TEXTS for a in ("--text", t)]
    want = lines(cli("embed", minilm, *args, "--normalize"))
    same_json(lines(cli("embed", out, *args, "--normalize", "--backend", fmt)), want)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_generate_from_an_exported_decoder_equals_the_torch_path(fmt, tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama")
    out = tmp_path / "out"
    cli("export", folder, out, "--format", fmt).ok()
    args = ["--prompt", "The capital of France is", "--prompt", "Once", "-n", "12", "--json"]
    want = lines(cli("generate", folder, *args))
    assert lines(cli("generate", out, *args)) == want
    assert cli("generate", out, *args, "--num-beams", "2").error_line() == (
        "error: --num-beams: an exported model generates greedily; run the model folder for that"
    )


def test_backend_on_a_model_folder_is_one_line(tmp_path, minilm, cli):
    assert cli("embed", minilm, "--text", "hi", "--backend", "onnx").error_line() == (
        f"error: --backend onnx: {minilm} is not an exported folder (no manifest.json); graft export it first"
    )
