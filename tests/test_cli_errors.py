"""Every command, fed a bad input, exits non-zero with one line on stderr ("error: ...") and no traceback.

The table has rows for every command registered on the typer app: a new command without a row fails.
Outputs are checked before any work: the output rows name a model that does not exist, so the output's
error can only come first.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer

from graft.cli import app

Case = Callable[[Path], tuple[list, list[str]]]  # tmp_path -> (argv, fragments the error line holds)


def registered_commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def file(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CASES: dict[str, list[Case]] = {
    "info": [
        lambda t: (["info", t / "nowhere"], ["nowhere", "does not exist"]),
    ],
    "embed": [
        lambda t: (
            ["embed", t / "no-model", "--text", "hi", "--out", folder(t / "dir")],
            [f"{t / 'dir'}: is a folder; --out takes a file name"],
        ),
        lambda t: (["embed", t / "no-model", "--file", folder(t / "lines")], ["lines", "is a folder"]),
        lambda t: (["embed", t / "no-model", "--text", "hi", "--batch-size", "0"], ["--batch-size"]),
    ],
    "generate": [
        lambda t: (["generate", t / "nowhere", "--prompt", "hi"], ["nowhere"]),
        lambda t: (["generate", t / "nowhere", "-p", "hi", "--compile"], ["--compile", "--dtype bfloat16"]),
        lambda t: (
            ["generate", t / "nowhere", "-p", "hi", "--json-schema", t / "no.json"],
            ["no.json", "no such file"],
        ),
        lambda t: (
            ["generate", t / "nowhere", "-p", "hi", "--json-schema", "{bad"],
            ["--json-schema: not JSON"],
        ),
        lambda t: (
            ["generate", t / "nowhere", "-p", "hi", "--json-schema", file(t / "list.json", "[1]")],
            ["list.json: a JSON schema is an object, not list"],
        ),
        lambda t: (
            ["generate", t / "nowhere", "-p", "hi", "--grammar", t / "g.lark"],
            ["g.lark: no such file"],
        ),
    ],
    "chat": [
        lambda t: (["chat", t / "nowhere"], ["nowhere"]),
        lambda t: (["chat", t / "nowhere", "--compile"], ["--compile", "--dtype bfloat16"]),
    ],
    "convert": [
        lambda t: (["convert", t / "nowhere.gguf", t / "hf"], ["nowhere.gguf"]),
        lambda t: (
            ["convert", t / "nowhere.gguf", file(t / "hf.txt")],
            [f"{t / 'hf.txt'}: is a file; OUT takes a folder"],
        ),
        lambda t: (
            ["convert", t / "nowhere.gguf", file(t / "full" / "config.json").parent],
            ["full: folder is not empty (pass --overwrite to replace it)"],
        ),
    ],
    "predict": [
        lambda t: (
            ["predict", t / "no-model", "--input", file(t / "in.jsonl"), "--output", folder(t / "dir")],
            [
                f"{t / 'dir'}: is a folder; --output takes a file name (e.g. {t / 'dir' / 'predictions.jsonl'})"
            ],
        ),
        lambda t: (
            ["predict", t / "no-model", "--input", "x.jsonl", "--output", file(t / "f") / "out.jsonl"],
            [f"{t / 'f'}: is a file, so --output {t / 'f' / 'out.jsonl'} cannot be created"],
        ),
        lambda t: (["predict", t / "no-model"], ["Missing option '--input'"]),
        lambda t: (
            ["predict", t / "no-model", "--input", "x.jsonl", "--device", "tpu"],
            ["--device tpu: torch cannot use it here (Expected one of cpu, cuda"],
        ),
    ],
    "eval": [
        lambda t: (
            ["eval", t / "no-model", "--data", file(t / "d.csv"), "--out", file(t / "taken")],
            [f"{t / 'taken'}: is a file; --out takes a folder"],
        ),
        lambda t: (["eval", t / "no-model", "--data", "d.csv", "--batch-size", "x"], ["--batch-size"]),
    ],
    "train": [
        lambda t: (["train", t / "nowhere.yaml"], ["nowhere.yaml", "not found"]),
        lambda t: (["train", folder(t / "recipes")], ["recipes", "is a folder"]),
    ],
    "pretrain": [
        lambda t: (["pretrain", t / "nowhere.yaml"], ["nowhere.yaml", "not found"]),
        lambda t: (
            ["pretrain", file(t / "r.yaml", "pretrain:\n  objective: mlmm\n")],
            ["pretrain.objective: unknown value 'mlmm'", "did you mean 'mlm'?"],
        ),
        lambda t: (
            ["pretrain", file(t / "r.yaml", "model:\n  path: m\ntrain:\n  max_steps: 2\n")],
            ["pretrain.files: no input files"],
        ),
    ],
    "export": [
        lambda t: (
            ["export", t / "no-model", t / "o", "--format", "tflite"],
            ["--format tflite: not one of"],
        ),
        lambda t: (
            ["export", t / "no-model", t / "o", "--format", "torchscript", "--int8"],
            ["--int8 is for --format onnx, not torchscript"],
        ),
        lambda t: (["export", t / "nowhere", t / "out"], ["nowhere", "does not exist"]),
        lambda t: (["export", t / "nowhere", t / "out", "--opset", "9"], ["--opset 9", "too old"]),
    ],
    "distill": [
        lambda t: (["distill", t / "nowhere.yaml"], ["nowhere.yaml", "not found"]),
        lambda t: (
            ["distill", file(t / "r.yaml", "train:\n  output: x\n")],
            ["distill.teacher: no teacher given"],
        ),
    ],
    "prune": [
        lambda t: (["prune", t / "no-model", t / "out", "--data", "d.csv"], ["nothing to remove", "--heads"]),
        lambda t: (
            ["prune", t / "no-model", file(t / "taken"), "--data", "d.csv", "--heads", "0.3"],
            ["is a file"],
        ),
        lambda t: (
            ["prune", t / "no-model", t / "out", "--data", "d.csv", "--heads", "0.3", "--scope", "local"],
            ["--scope local: not one of global, layer", "did you mean 'layer'"],
        ),
    ],
    "serve": [
        lambda t: (["serve", t / "nowhere"], ["nowhere", "does not exist"]),
        lambda t: (["serve", t / "nowhere", "--max-batch-tokens", "0"], ["--max-batch-tokens"]),
    ],
    "transcribe": [
        lambda t: (["transcribe", t / "nowhere", file(t / "a.txt")], ["nowhere"]),
        lambda t: (["transcribe", t / "nowhere", t / "missing.wav"], ["missing.wav", "no such audio file"]),
    ],
    "heads": [
        lambda t: (
            ["heads", t / "no-model", "--data", "d.csv", "--out", file(t / "taken")],
            ["is a file; --out"],
        ),
    ],
    "tune": [
        lambda t: (["tune", t / "nowhere.yaml"], ["nowhere.yaml", "not found"]),
        lambda t: (["tune", t / "nowhere.yaml", "--trials", "0"], ["--trials"]),
    ],
    "compare": [
        lambda t: (["compare", t / "nowhere.yaml"], ["nowhere.yaml", "not found"]),
    ],
    "demo": [
        lambda t: (["demo", "--steps", "0"], ["--steps"]),
    ],
    "explain": [
        lambda t: (["explain", t / "nowhere", "--text", "hi"], ["nowhere"]),
        lambda t: (
            ["explain", t / "nowhere", "--text", "hi", "--out", file(t / "taken")],
            [f"{t / 'taken'}: is a file; --out takes a folder"],
        ),
        lambda t: (
            ["explain", t / "nowhere", "--text", "hi", "--method", "gi"],
            ["--method 'gi' is not one of"],
        ),
    ],
    "probe": [
        lambda t: (
            ["probe", t / "nowhere", "--data", file(t / "d.csv", "text,kind\na,b\n"), "--property", "knd"],
            ["column 'knd': no such column", "did you mean 'kind'"],
        ),
    ],
    "fairness": [
        lambda t: (
            ["fairness", t / "nowhere", "--template", "No slot.", "--groups", "he,she"],
            ["--template 'No slot.': no {} where the group word goes"],
        ),
        lambda t: (["fairness", t / "nowhere", "--template", "The {}.", "--groups", "he"], ["--groups 'he'"]),
    ],
    "quantize": [
        lambda t: (["quantize", t / "nowhere", t / "q"], ["nowhere", "does not exist"]),
        lambda t: (
            ["quantize", t / "nowhere", file(t / "q.txt")],
            [f"{t / 'q.txt'}: is a file; OUT takes a folder"],
        ),
        lambda t: (
            ["quantize", t / "nowhere", t / "q", "--method", "int4"],
            ["--method", "unknown method 'int4'"],
        ),
        lambda t: (
            ["quantize", t / "nowhere.gguf", t / "q", "--method", "int4-weight"],
            ["nowhere.gguf: no such file"],
        ),
    ],
    "compress": [
        lambda t: (
            ["compress", t / "nowhere", "--data", file(t / "d.csv"), "--plan", "fp32,int9", "--out", t / "o"],
            ["--plan: unknown step 'int9'"],
        ),
        lambda t: (
            ["compress", t / "nowhere", "--data", file(t / "d.csv"), "--plan", "fp32", "--out", t / "o"],
            ["nowhere", "does not exist"],
        ),
    ],
    "index": [
        lambda t: (
            ["index", t / "no-model", "--texts", file(t / "texts.txt"), "--out", file(t / "taken")],
            [f"{t / 'taken'}: is a file; --out takes a folder"],
        ),
    ],
    "search": [
        lambda t: (["search", folder(t / "empty"), "--text", "a"], ["empty: not an index"]),
    ],
    "zeroshot": [
        lambda t: (["zeroshot", t / "no-model", "--labels", "", t / "x.png"], ["zero-shot: no labels given"]),
        lambda t: (
            ["zeroshot", t / "no-model", "--labels", "a,b", "--text", "x", "--data", file(t / "d.jsonl")],
            ["zeroshot: give texts with --text (one or more) or --data FILE, not both"],
        ),  # fmt: skip
    ],
    "icl": [
        lambda t: (
            ["icl", t / "m", "--examples", file(t / "ex.jsonl"), "--labels", "a,b", "--select", "similar"],
            ["icl --select similar: needs a sentence encoder", "--encoder MODEL"],
        ),
    ],
    "curve": [
        lambda t: (
            ["curve", t / "no-recipe.yaml", "--labels", "0,few"],
            ["'few' is not a count of labels per class"],
        ),
        lambda t: (
            ["curve", t / "no-recipe.yaml", "--out", file(t / "taken")],
            [f"{t / 'taken'}: is a file; --out takes a folder"],
        ),  # fmt: skip
    ],
    "setfit": [
        lambda t: (
            ["setfit", t / "no-recipe.yaml", "--out", file(t / "taken")],
            [f"{t / 'taken'}: is a file; --out takes a folder"],
        ),  # fmt: skip
    ],
    "tokenizer": [
        lambda t: (
            ["tokenizer", "train", t / "none.txt", "--out", t / "tok"],
            [f"{t / 'none.txt'}: file not found"],
        ),
        lambda t: (
            ["tokenizer", "extend", t / "nowhere", "word", "--out", t / "m"],
            [f"{t / 'nowhere'}: model folder does not exist"],
        ),
    ],
    "rag": [
        lambda t: (
            ["rag", "index", t / "nowhere", "--model", t / "no-model", "--out", t / "idx"],
            [f"{t / 'nowhere'}: file not found"],
        ),
        lambda t: (
            ["rag", "ask", folder(t / "empty"), "q", "--model", t / "no-model"],
            ["empty: not a graft rag index (manifest.json not found"],
        ),
    ],
}


@pytest.mark.parametrize("command", registered_commands())
def test_every_command_refuses_bad_input_in_one_line(command, cli, tmp_path):
    assert command in CASES, f"graft {command} has no row in CASES: add a representative bad input"
    for number, case in enumerate(CASES[command]):
        where = tmp_path / str(number)
        argv, fragments = case(folder(where))
        before = sorted(where.rglob("*"))
        line = cli(*argv).error_line()
        for fragment in fragments:
            assert fragment in line, (argv, line)
        assert sorted(where.rglob("*")) == before, f"{argv} left files behind"


def test_global_options_are_checked(cli):
    line = cli("--threads", "0", "info", "x").error_line()
    assert "'--threads'" in line and "greater than or equal to 1" in line
    assert "No such command 'nope'" in cli("nope").error_line()


def test_a_usage_error_is_one_line_in_a_real_process(tmp_path):
    """The in-process runs above go through main() as the console script does; once for real."""
    done = subprocess.run(
        [sys.executable, "-m", "graft", "embed", "x", "--text", "hi", "--out", tmp_path],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"error: {tmp_path}: is a folder; --out takes a file name (e.g. {tmp_path / 'embeddings.json'})\n"
    )


# ------------------------------------------------------------------- files the user may not read


@pytest.fixture
def unreadable(monkeypatch) -> Callable[[Path], Path]:
    """deny(path): open() of it fails with PermissionError, as after chmod 000 for a normal user.

    (chmod itself proves nothing here: tests may run as root, who reads any file.)
    """
    denied: set[str] = set()
    real_open = builtins.open

    def guarded_open(name, *args, **kwargs):
        if isinstance(name, str | os.PathLike) and os.path.abspath(name) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # pathlib opens through io.open

    def deny(path: Path) -> Path:
        denied.add(os.path.abspath(path))
        return path

    return deny


def test_unreadable_recipe_is_one_line_naming_it(cli, tmp_path, unreadable):
    recipe = unreadable(file(tmp_path / "recipe.yaml", "model: {path: x}\n"))
    for command in ("train", "tune", "compare"):
        line = cli(command, recipe).error_line()
        assert str(recipe) in line and "permission denied" in line.lower(), line


def test_unreadable_lines_file_is_one_line_naming_it(cli, tmp_path, unreadable):
    lines = unreadable(file(tmp_path / "texts.txt"))
    line = cli("embed", tmp_path / "no-model", "--file", lines).error_line()
    assert line == f"error: {lines}: cannot read (Permission denied)"


def test_unreadable_data_file_is_one_line_naming_it(cli, tmp_path, unreadable, task_model):
    data = unreadable(file(tmp_path / "in.jsonl", '{"text": "hi"}\n'))
    for argv in (["predict", task_model, "--input", data], ["eval", task_model, "--data", data]):
        line = cli(*argv).error_line()
        assert str(data) in line and "permission denied" in line.lower(), line


def test_any_os_error_at_the_boundary_is_one_line(cli, tmp_path, monkeypatch):
    """The last resort in main(): an OSError no reader caught still names its file in one line."""
    import graft.cli.models

    def broken(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(graft.cli.models, "read_lines", broken)
    line = cli("embed", "x", "--file", tmp_path / "t.txt").error_line()
    assert line == f"error: {tmp_path / 't.txt'}: Input/output error"


@pytest.fixture(scope="module")
def task_model(tmp_path_factory, minilm) -> Path:
    """A random tiny classifier with all-MiniLM-L6-v2's tokenizer."""
    import torch
    import transformers
    from conftest import tiny_hf_config

    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = tiny_hf_config("bert")
    config.vocab_size = 30522
    config.id2label = {0: "negative", 1: "positive"}
    path = tmp_path_factory.mktemp("model") / "classifier"
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    Tokenizer.from_folder(minilm).save(path)
    return path


def test_a_full_disk_names_the_output_not_its_temporary_file(cli, tmp_path, monkeypatch, minilm):
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file named

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "emb.json"
    line = cli("embed", minilm, "--text", "hi", "--out", out).error_line()
    assert line == f"error: {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []
