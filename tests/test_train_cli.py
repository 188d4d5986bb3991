"""`graft train` / `graft tune` end to end on a tiny BERT, the recipes in recipes/, one-line errors.

Runs in this process (the ``cli`` fixture), except one smoke test per command in a real process.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graft.loading import load_model
from graft.tasks import HEADS
from graft.train import load_recipe
from graft.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "classification.yaml"


def graft(*args) -> subprocess.CompletedProcess:
    """``python -m graft ARGS...`` in a real process: for the one smoke test of each command."""
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm) -> dict[str, Path]:
    """A tiny random BERT with MiniLM's tokenizer, and 60 labelled texts of two easy classes."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / "model" / name)
    rng = random.Random(0)
    words = {"sport": "goal match team win league", "tech": "chip software phone data cloud"}
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(60):
            label = rng.choice(sorted(words))
            writer.writerow(
                [" ".join(rng.choice(words[label].split()) for _ in range(rng.randint(3, 20))), label]
            )
    return {"model": folder / "model", "data": folder / "train.csv"}


def base_args(assets, out) -> list[str]:
    return [
        f"model.path={assets['model']}", f"data.train={assets['data']}", f"train.output={out}",
        "train.batch_size=8", "train.plots=false", "optim.lr=1e-3",
    ]  # fmt: skip


def test_train_in_a_real_process_writes_a_run_folder_and_resume_finishes_it(tmp_path, assets, cli):
    out = tmp_path / "run"
    done = graft("train", RECIPE, *base_args(assets, out), "train.epochs=2", "checkpoint.every=2", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 12 and "eval/accuracy" in result and "test/accuracy" in result
    assert f"saved the trained model to {out / 'model'}" in done.stderr.splitlines()
    for name in ("config.yaml", "run.json", "metrics.jsonl", "result.json", "model/config.json"):
        assert (out / name).exists(), name
    model = load_model(out / "model")
    assert model.task == "classification" and model.head.id2label == ["sport", "tech"]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == 12
    again = cli(
        "train", RECIPE, *base_args(assets, out), "train.epochs=2", "checkpoint.every=2", "--resume", "-q"
    )
    assert json.loads(again.ok().stdout.strip().splitlines()[-1])["steps"] == 12


def test_an_earlier_model_is_replaced_only_with_overwrite(tmp_path, assets, cli):
    out = tmp_path / "run"
    args = ["train", RECIPE, *base_args(assets, out), "train.max_steps=1", "checkpoint.keep=0", "-q"]
    cli(*args).ok()
    before = (out / "model" / "model.safetensors").read_bytes()
    refused = cli(*args, "train.seed=1")
    assert refused.code == 1 and refused.error_line() == (
        f"error: {out / 'model'}: holds the model of an earlier run; pass --overwrite to replace it "
        "(--resume to continue that run), or set train.output to a new folder"
    )
    assert (out / "model" / "model.safetensors").read_bytes() == before
    cli(*args, "train.seed=1", "--overwrite").ok()
    assert (out / "model" / "model.safetensors").read_bytes() != before


def test_training_data_without_labels_is_one_line(tmp_path, assets, cli):
    data = tmp_path / "texts.csv"
    data.write_text("text\nthe match was won\nthe chip is fast\n" * 10)
    done = cli("train", RECIPE, *base_args(assets, tmp_path / "run"), f"data.train={data}")
    assert done.code == 1 and done.error_line() == (
        f"error: {data}: no 'label' column, which training a classification model needs (read: text); "
        "name yours with data.columns, e.g. data.columns={YOUR_COLUMN: label}"
    )


def test_the_demo_runs_again_in_the_same_folder(tmp_path, assets, cli):
    data = tmp_path / "topics"
    for label, words in (("sport", "goal match team win"), ("tech", "chip software phone data")):
        (data / label).mkdir(parents=True)
        for i in range(10):
            (data / label / f"{i}.txt").write_text(f"{words.split()[i % 4]} {words}\n")
    args = ["demo", "--model", assets["model"], "--data", data, "--output", tmp_path / "demo", "--steps", "2",
            "--batch-size", "4", "--max-length", "16", "-q"]  # fmt: skip
    for _ in range(2):
        done = cli(*args).ok()
        assert f"merged model to {tmp_path / 'demo' / 'model'}" in done.stdout
    assert load_model(tmp_path / "demo" / "model").head.id2label == ["sport", "tech"]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["adapter", "model", "run"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "error: override optim.lrr=1: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        (
            "optim.name=adamx",
            "override optim.name=adamx: optim.name: unknown value 'adamx' (one of adamw, adafactor, sgd); did you mean 'adamw'?",
        ),
        ("data.train=/nonexistent/train.csv", "error: /nonexistent/train.csv: no such file or folder"),
        (  # renamed: a "strategy" is a transfer strategy (recipe key strategy.name)
            "distributed.strategy=ddp",
            "error: override distributed.strategy=ddp: unknown key 'distributed.strategy'; "
            "did you mean 'distributed.mode'?",
        ),
        (
            "task.name=clasification",
            "task.name: unknown value 'clasification' (one of causal-lm, masked-lm, classification, "
            "token-classification, question-answering, embedding, image-classification, seq2seq, image-text); "
            "did you mean 'classification'?",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path, assets, override, message, cli):
    done = cli("train", RECIPE, *base_args(assets, tmp_path / "run"), override)
    assert done.code == 1 and message in done.error_line()


def test_tune_in_a_real_process_prints_and_saves_results(tmp_path, assets):
    out = tmp_path / "search"
    space = "tune.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}"
    done = graft(
        "tune", RECIPE, *base_args(assets, out), "train.epochs=1", "checkpoint.keep=0", space, "--trials", "2"
    )
    assert done.returncode == 0, done.stderr
    assert "hyperparameter search" in done.stdout and "best: trial" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == 2 and results["metric"] == "accuracy"
    best = load_recipe(out / "best.yaml")
    assert best.optim.lr == pytest.approx(results["best_params"]["optim.lr"])
    assert (out / "results.csv").read_text().startswith("trial,state,accuracy,optim.lr")


def test_tune_again_in_the_same_folder_needs_overwrite(tmp_path, assets, cli):
    out = tmp_path / "search"
    space = "tune.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}"
    args = ("tune", RECIPE, *base_args(assets, out), "train.max_steps=2", "checkpoint.keep=0", space)
    assert cli(*args, "--trials", "1").ok()
    first = (out / "results.json").read_text()
    refused = cli(*args, "--trials", "2")
    assert refused.code == 1
    assert refused.error_line() == (
        f"error: {out}: holds an earlier search (1 trial folders); pass --overwrite to replace it, "
        "or set train.output to a new folder"
    )
    assert (out / "results.json").read_text() == first  # nothing of the earlier search was touched
    assert cli(*args, "--trials", "2", "--overwrite").ok()
    assert len(json.loads((out / "results.json").read_text())["trials"]) == 2


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_recipes_are_valid(path):
    recipe = load_recipe(path)
    if path.stem.startswith("pretrain-"):  # graft pretrain's: named by their objective
        assert recipe.pretrain.objective == path.stem.removeprefix("pretrain-")
        return
    # named by their task, or by their task and a use (seq2seq-speech.yaml)
    assert recipe.task.name in HEADS
    assert path.stem == recipe.task.name or path.stem.startswith(recipe.task.name + "-")
