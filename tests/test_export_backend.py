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
    assert cli("generate", out, *args, "--regex", "[0-9]+").error_line() == (
        "error: --json-schema/--regex/--grammar: an exported model generates greedily; run the model folder for that"
    )


def test_backend_on_a_model_folder_is_one_line(tmp_path, minilm, cli):
    assert cli("embed", minilm, "--text", "hi", "--backend", "onnx").error_line() == (
        f"error: --backend onnx: {minilm} is not an exported folder (no manifest.json); graft export it first"
    )


def test_generate_on_an_exported_decoder_honours_its_generation_config(tmp_path, minilm, cli):
    """graft export copies generation_config.json; graft generate reads it from the exported folder
    as from the model folder: its eos token ends a row, its max_new_tokens bounds the others."""
    from graft.generation import GenerationConfig, encode_prompts, generate
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama")
    prompts = ["The capital of France is", "Once"]
    tokenizer = Tokenizer.from_folder(folder)
    ids, mask = encode_prompts(tokenizer, prompts)
    greedy = GenerationConfig(max_new_tokens=8, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    rows = generate(load_model(folder, task="causal-lm"), ids, mask, greedy)[:, ids.shape[1] :].tolist()
    first = rows[0]
    # an eos token that ends row 0 after its first token (and before max_new_tokens) and never row 1
    end = next(i for i in range(1, 5) if first[i] not in first[:i] and first[i] not in rows[1])
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": first[end], "max_new_tokens": 5})
    )
    out = tmp_path / "out"
    cli("export", folder, out).ok()
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 5

    args = [a for p in prompts for a in ("--prompt", p)] + ["--json"]
    want = [
        {"prompt": prompts[0], "completion": tokenizer.decode(first[:end])},
        {"prompt": prompts[1], "completion": tokenizer.decode(rows[1][:5])},
    ]
    assert lines(cli("generate", folder, *args)) == want
    assert lines(cli("generate", out, *args)) == want
    assert lines(cli("generate", out, *args, "-n", "8"))[1]["completion"] == tokenizer.decode(rows[1])

    (out / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    assert cli("generate", out, *args).error_line() == (
        f"error: {out / 'generation_config.json'}: do_sample is true, and an exported model generates "
        "greedily: add --temperature 0"
    )
    assert len(lines(cli("generate", out, *args, "--temperature", "0"))) == 2
