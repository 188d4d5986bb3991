"""``graft curve``: every (method, labels, seed) runs once on the same test split, the table and
plot are written, a stopped curve resumes, and bad flags are one line."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from test_fewshot import FOOD, SPORT

from graft.errors import GraftError
from graft.fewshot.curve import parse_labels, per_class, points

MORE_SPORT = ["The referee showed a red card.", "Our club signed a new goalkeeper.", "The tennis final went to five sets.",
              "The cyclist won the mountain stage.", "Fans cheered the winning try.", "The batsman hit a century."]  # fmt: skip
MORE_FOOD = ["Chop the carrots into small cubes.", "Roast the chicken with garlic and lemon.", "Stir the risotto until creamy.",
             "Season the salad with olive oil.", "Knead the dough for ten minutes.", "Grill the fish for five minutes."]  # fmt: skip


def recipe_file(tmp_path, model) -> str:
    rows = [{"text": t, "label": "sport"} for t in SPORT + MORE_SPORT] + [
        {"text": t, "label": "food"} for t in FOOD + MORE_FOOD
    ]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {model}}}\n"
        f"data: {{train: {data}, val_fraction: 0.0, test_fraction: 0.3, max_length: 24}}\n"
        "optim: {lr: 5.0e-5}\ntrain: {batch_size: 4, epochs: 1}\n"
    )  # fmt: skip
    return str(recipe)


@pytest.mark.slow  # 17 short trainings of MiniLM
def test_the_curve_runs_every_point_once_and_resumes(minilm, cli, tmp_path):
    recipe = recipe_file(tmp_path, minilm)
    out = tmp_path / "curve"
    args = ["curve", recipe, "--labels", "0,2,all", "--methods", "zeroshot,setfit,features,lora,full", "--seeds", "2",
            "--out", out, "--min-steps", "2", "--setfit-pairs", "16", "--set", "lora:optim.lr=1e-3", "--quiet"]  # fmt: skip
    result = cli(*args).ok()
    rows = list(csv.DictReader((out / "curve.csv").open()))
    runs = [(r["method"], r["labels"], r["seed"]) for r in rows]
    expected = [("zeroshot", "0", "0")] + [
        (m, k, s) for m in ("setfit", "features", "lora", "full") for k in ("2", "all") for s in ("0", "1")
    ]
    assert runs == expected
    assert {r["test"] for r in rows} == {"6"}  # 30% of 20, stratified: one test split for all
    assert {(r["labels"], r["examples"]) for r in rows} == {("0", "0"), ("2", "4"), ("all", "14")}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    table = (out / "curve.md").read_text()
    assert table.splitlines()[0] == "| method | 0 / class | 2 / class | all / class |"
    assert result.stdout == table
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the lora override reached its runs only
    config = yaml.safe_load((out / "runs" / "lora-2-0" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 1e-3 and config["strategy"]["name"] == "lora"
    config = yaml.safe_load((out / "runs" / "full-2-0" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 5e-5 and config["strategy"]["name"] == "full"

    # a second call refuses to overwrite; --resume reruns nothing
    assert "holds a curve (curve.csv); pass --resume" in cli(*args).error_line()
    (out / "curve.md").unlink()
    cli(*args, "--resume").ok()
    assert list(csv.DictReader((out / "curve.csv").open())) == rows
    assert (out / "curve.md").read_text() == table


def test_points_and_draws():
    assert parse_labels("all,8,0") == [0, 8, None]
    assert points(["zeroshot", "icl", "full"], [0, 8, 32, None], 2, icl_max=8) == [
        ("zeroshot", 0, 0), ("icl", 8, 0), ("icl", 8, 1),
        ("full", 8, 0), ("full", 8, 1), ("full", 32, 0), ("full", 32, 1), ("full", None, 0), ("full", None, 1),
    ]  # fmt: skip
    labels = ["a"] * 5 + ["b"] * 3
    picked = per_class(labels, 2, seed=1)
    assert sorted(labels[i] for i in picked) == ["a", "a", "b", "b"] and picked == per_class(
        labels, 2, seed=1
    )
    assert per_class(labels, None, 0) == list(range(8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "0,eight"], "--labels '0,eight': 'eight' is not a count of labels per class or 'all'"),
        (["--methods", "zeroshot,setfti"], "--methods: unknown method 'setfti'; did you mean 'setfit'?"),
        (["--labels", "8", "--methods", "zeroshot"], "--methods zeroshot: nothing to run (it needs 0 in --labels)"),
        (["--labels", "0,8", "--methods", "icl"], "--methods icl: needs a chat model (--chat-model MODEL"),
        (["--methods", "full", "--set", "lora:optim.lr=1"], "--set 'lora:optim.lr=1': expected METHOD:KEY=VALUE with METHOD one of --methods (full)"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(minilm, cli, tmp_path, args, message):
    assert message in cli("curve", recipe_file(tmp_path, minilm), "--out", tmp_path / "c", *args).error_line()


def test_a_recipe_without_a_test_split_is_refused(minilm, tmp_path):
    from graft.fewshot.curve import run_curve
    from graft.train.config import load_recipe

    recipe = load_recipe(recipe_file(tmp_path, minilm), ["data.test_fraction=0.0"])
    with pytest.raises(
        GraftError, match=r"^curve: the recipe has no test split \(data.test, or data.test_fraction > 0\)$"
    ):
        run_curve(recipe, [0], ["zeroshot"], 1, tmp_path / "c")


@pytest.mark.slow  # trains MiniLM
def test_graft_setfit_writes_a_folder_that_predicts_as_it_scored(minilm, cli, tmp_path):
    from graft.fewshot import SetFit
    from graft.fewshot.curve import accuracy

    recipe = recipe_file(tmp_path, minilm)
    out = tmp_path / "setfit"
    args = [
        "setfit",
        recipe,
        f"train.output={tmp_path / 'run'}",
        "--out",
        out,
        "--per-class",
        "3",
        "--iterations",
        "2",
    ]
    result = json.loads(cli(*args).ok().stdout)
    assert result["examples"] == 6
    test = [json.loads(line) for line in (tmp_path / "news.jsonl").read_text().splitlines()]
    loaded = SetFit.load(out)
    # the stratified 30% test split: recompute it from the data as the recipe cuts it
    from graft.data import load_splits
    from graft.train.config import load_recipe

    split = load_splits(load_recipe(recipe).data)["test"]
    texts, gold = [r["text"] for r in split], [r["label"] for r in split]
    assert result["test/accuracy"] == round(accuracy(loaded.predict(texts), gold), 4)
    assert len(test) == 20 and len(texts) == 6
    assert "folder is not empty (pass --overwrite to replace it)" in cli(*args).error_line()


def test_icl_points_score_the_chat_model_on_a_test_subset(minilm, cli, tmp_path):
    from test_serve import chat_folder

    chat = chat_folder(tmp_path / "chat")
    out = tmp_path / "curve"
    args = ["curve", recipe_file(tmp_path, minilm), "--labels", "1,2", "--methods", "icl", "--seeds", "2",
            "--chat-model", chat, "--icl-limit", "4", "--icl-max", "1", "--out", out, "--quiet"]  # fmt: skip
    cli(*args).ok()
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [(r["method"], r["labels"], r["seed"], r["examples"], r["test"]) for r in rows] == [
        ("icl", "1", "0", "2", "4"), ("icl", "1", "1", "2", "4")
    ]  # fmt: skip


def test_lora_trains_at_its_own_learning_rate_unless_set(tmp_path):
    """A recipe's learning rate is a full fine-tuning one: the curve gives LoRA 1e-3 (METHOD_DEFAULTS),
    --set lora:optim.lr=... wins over it, and the other methods keep the recipe's."""
    from graft.fewshot.curve import run_recipe_for
    from graft.train.config import load_recipe

    recipe = load_recipe(recipe_file(tmp_path, "unused-model"), [])
    run = {"k": 8, "seed": 0, "n": 16, "out": tmp_path, "min_steps": 2}
    assert run_recipe_for(recipe, "lora", overrides={}, strategy="lora", **run).optim.lr == 1e-3
    assert (
        run_recipe_for(recipe, "lora", overrides={"optim.lr": 3e-4}, strategy="lora", **run).optim.lr == 3e-4
    )
    assert run_recipe_for(recipe, "full", overrides={}, strategy="full", **run).optim.lr == 5e-5
