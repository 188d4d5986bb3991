"""`graft compress`: the plan's grammar and its one-line errors, the Pareto front on hand-made points,
and a whole run on a tiny random classifier and a tiny CSV (one row per step, sizes as on disk,
the front as computed from the table, the plot written)."""

from __future__ import annotations

import csv
import random
import shutil

import pytest
import torch
import transformers
from conftest import hf_model

from graft.compress.compare import check_plan, pareto
from graft.compress.plan import parse_plan
from graft.compress.quantize import size_on_disk
from graft.errors import GraftError
from graft.loading import load_model
from graft.tasks import TaskModel

PLAN = "fp32,bf16,int8-dynamic,int8-weight,distill:layers=2,prune:heads=0.25,ffn=0.25"


def test_the_pareto_front_of_hand_made_points():
    points = [
        (0.90, 10.0),  # the most accurate: on the front
        (0.85, 5.0),  # faster, a little less accurate: on the front
        (0.85, 6.0),  # as accurate as the one above, slower: dominated
        (0.80, 5.0),  # as fast as (0.85, 5.0), less accurate: dominated
        (0.70, 2.0),  # the fastest: on the front
        (0.60, 3.0),  # slower and less accurate than (0.70, 2.0): dominated
        (0.90, 10.0),  # equal to the first: neither dominates the other
    ]
    assert pareto(points) == [True, True, False, False, True, False, True]
    assert pareto([(0.5, 1.0)]) == [True]
    assert pareto([]) == []


def test_a_plan_reads_into_steps_with_their_options():
    steps = parse_plan(PLAN.replace("layers=2", "layers=3,steps=10,lr=1e-4") + ",prune:heads=0.5,scope=layer")
    kinds = ["fp32", "bf16", "int8-dynamic", "int8-weight", "distill", "prune", "prune"]
    assert [s.kind for s in steps] == kinds
    assert steps[4].options == {"layers": 3, "steps": 10, "lr": 1e-4}
    assert steps[5].options == {"heads": 0.25, "ffn": 0.25}
    assert [s.text for s in steps[4:6]] == [
        "distill:layers=3,steps=10,lr=0.0001",
        "prune:heads=0.25,ffn=0.25",
    ]
    assert steps[5].slug == "prune-heads0.25-ffn0.25" and steps[5].trained and not steps[0].trained
    assert (
        steps[6].options == {"heads": 0.5, "scope": "layer"} and steps[6].slug == "prune-heads0.5-scopelayer"
    )


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("", "--plan: empty; give comma-separated steps, e.g. fp32,int8-dynamic,distill:layers=3"),
        ("fp32,,bf16", "--plan 'fp32,,bf16': an empty step (two commas in a row, or one at an end)"),
        (
            "fp32,int8-dynamc",
            "--plan: unknown step 'int8-dynamc' (known: fp32, int8-dynamic, int8-weight, bf16, distill, prune);"
            " did you mean 'int8-dynamic'?",
        ),
        ("heads=0.3,fp32", "--plan: option 'heads=0.3' comes before any step"),
        ("bf16:x=1", "--plan: step 'bf16' takes no options (got 'x=1')"),
        ("int8-weight,ffn=0.25", "--plan: step 'int8-weight' takes no options (got 'ffn=0.25')"),
        (
            "distill:layer=3",
            "--plan: distill has no key 'layer' (known: layers, steps, lr); did you mean 'layers'?",
        ),
        ("distill:layers", "--plan: distill: expected KEY=VALUE, got 'layers'"),
        ("distill:layers=three", "--plan: distill:layers: expected int, got 'three'"),
        ("distill:layers=2.5", "--plan: distill:layers: expected int, got '2.5'"),
        (
            "distill:steps=5",
            "--plan: distill needs layers=N, the student's number of layers (e.g. distill:layers=3)",
        ),
        ("distill:layers=0", "--plan: distill:layers=0: expected a whole number of at least 1"),
        ("distill:layers=2,layers=3", "--plan: distill:layers is given twice"),
        (
            "prune:steps=5",
            "--plan: prune needs heads=FRACTION and/or ffn=FRACTION (e.g. prune:heads=0.33,ffn=0.25)",
        ),
        ("prune:heads=1.5", "--plan: prune:heads=1.5: expected a fraction from 0 to below 1"),
        ("prune:heads=0.3,lr=0", "--plan: prune:lr=0.0: expected a learning rate above 0"),
        (
            "prune:heads=0.3,scope=local",
            "--plan: prune:scope=local: not one of global, layer; did you mean 'layer'?",
        ),
        ("fp32,bf16,fp32", "--plan: step 'fp32' appears twice"),
    ],
)
def test_a_bad_plan_is_one_line(plan, message):
    with pytest.raises(GraftError) as e:
        parse_plan(plan)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("family", "task", "plan", "message"),
    [
        (
            "llama",  # 4 query heads share 2 key/value heads
            "classification",
            "fp32,prune:heads=0.25",
            "--plan: prune:heads=0.25: llama shares key/value heads between query heads (grouped-query attention);"
            " prune:ffn=FRACTION alone prunes only the feed-forward",
        ),
        ("llama", "classification", "fp32,prune:ffn=0.5", None),  # the feed-forward alone: accepted
        (
            "t5",
            "seq2seq",
            "fp32,int8-dynamic",
            "compress: a seq2seq model; graft compress compares classification and token-classification models",
        ),
        (
            "bert",
            "classification",
            "fp32,distill:layers=3",
            "--plan: distill:layers=3 is more than the model's 2 layers",
        ),
    ],
)
def test_what_a_family_or_model_cannot_do_is_refused_before_the_first_variant(
    family, task, plan, message, tmp_path
):
    hf_model(family, "seq2seq" if task == "seq2seq" else "base").save_pretrained(tmp_path)
    model = load_model(tmp_path, task=task, **({"id2label": ["a", "b"]} if task == "classification" else {}))
    assert isinstance(model, TaskModel)
    steps = parse_plan(plan)
    if message is None:
        check_plan(steps, model, [{"text": "x", "label": "a"}])
        return
    with pytest.raises(GraftError) as e:
        check_plan(steps, model, [{"text": "x", "label": "a"}])
    assert str(e.value) == message


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm):
    """A tiny random BERT classifier (4 layers of 4 heads) with MiniLM's tokenizer, and labelled CSVs."""
    folder = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=64, id2label={0: "sport", 1: "tech"}, label2id={"sport": 0, "tech": 1},
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(folder / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / "model" / name)
    rng = random.Random(0)
    words = {"sport": "goal match team win league", "tech": "chip software phone data cloud"}
    for name, count in (("train.csv", 48), ("test.csv", 20)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(count):
                label = rng.choice(sorted(words))
                writer.writerow(
                    [" ".join(rng.choice(words[label].split()) for _ in range(rng.randint(3, 12))), label]
                )
    return {"model": folder / "model", "train": folder / "train.csv", "test": folder / "test.csv"}


def run_args(assets, out, plan: str = PLAN) -> list:
    return [
        "compress", assets["model"], "--data", assets["test"], "--train", assets["train"], "--plan", plan,
        "--out", out, "--steps", "3", "--batch-size", "8", "--texts", "16", "--latency", "3", "--rounds", "2",
        "--max-length", "16", "-q",
    ]  # fmt: skip


def test_compress_writes_one_row_per_step_with_sizes_front_and_plot(assets, tmp_path, cli):
    out = tmp_path / "out"
    done = cli(*run_args(assets, out)).ok()
    assert done.stdout.splitlines()[-1] == f"wrote {out / 'report.md'}, report.csv and pareto.png"
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [s.text for s in parse_plan(PLAN)]
    assert [r["variant"] for r in rows] == names
    assert all(r["metric"] == "accuracy" and 0.0 <= float(r["score"]) <= 1.0 for r in rows)
    assert all(float(r["p50_ms_batch1"]) > 0 and float(r["examples_per_s_batch32"]) > 0 for r in rows)
    # the front as the table's own numbers give it
    front = pareto([(float(r["score"]), float(r["p50_ms_batch1"])) for r in rows])
    assert [r["pareto"] == "1" for r in rows] == front and any(front)
    # bytes as on disk: the source for fp32, each variant's own folder for the others
    sizes = {r["variant"]: int(r["bytes"]) for r in rows}
    assert sizes["fp32"] == size_on_disk(assets["model"])
    for step in parse_plan(PLAN)[1:]:
        assert sizes[step.text] == size_on_disk(out / "models" / step.slug)
    assert sizes["int8-dynamic"] < 0.5 * sizes["fp32"] and sizes["bf16"] < 0.6 * sizes["fp32"]
    # the students are smaller models that graft loads back
    student = load_model(out / "models" / "distill-layers2")
    assert student.body.config.num_layers == 2
    pruned = load_model(out / "models" / "prune-heads0.25-ffn0.25").body.config
    assert (
        sum(pruned.heads(i) for i in range(4)) == 12 and sum(pruned.intermediate(i) for i in range(4)) == 120
    )
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == names
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # nothing half-written left


def test_compress_errors_are_one_line(assets, tmp_path, cli):
    out = tmp_path / "out"
    bad = cli(*run_args(assets, out, "fp32,int8-dynamc"))
    assert bad.code == 1 and bad.error_line() == (
        "error: --plan: unknown step 'int8-dynamc' (known: fp32, int8-dynamic, int8-weight, bf16, distill,"
        " prune); did you mean 'int8-dynamic'?"
    )
    args = run_args(assets, out, "fp32,distill:layers=2")
    no_train = cli(*args[:4], *args[6:])
    assert no_train.error_line() == (
        "error: compress: distill:layers=2 trains the model; give labelled training data with --train FILE"
    )
    deep = cli(*run_args(assets, out, "fp32,distill:layers=5"))
    assert deep.error_line() == "error: --plan: distill:layers=5 is more than the model's 4 layers"
    many = cli(*run_args(assets, out, "prune:heads=0.9"))
    assert many.error_line() == (
        "error: --plan: prune:heads=0.9 asks for 14 of 16 heads, but each of the 4 layers keeps at least one"
        " (12 at most)"
    )
    zero = cli(*run_args(assets, out, "fp32"), "--lr", "0")
    assert zero.error_line() == "error: --lr 0.0: must be above 0"
    assert not out.exists()  # nothing written by a refused run
    (out / "x").mkdir(parents=True)
    full = cli(*run_args(assets, out, "fp32"))
    assert "pass --overwrite" in full.error_line() and (out / "x").is_dir()


@pytest.mark.slow
def test_onnx_adds_graft_exports_as_rows(assets, tmp_path, cli):
    out = tmp_path / "out"
    cli(*run_args(assets, out, "fp32,int8-dynamic"), "--onnx").ok()
    with open(out / "report.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["fp32", "int8-dynamic", "onnx-fp32", "onnx-int8"]
    for name in ("onnx-fp32", "onnx-int8"):
        assert int(rows[name]["bytes"]) == (out / "models" / name / "model.onnx").stat().st_size
    assert int(rows["onnx-int8"]["bytes"]) < 0.5 * int(rows["onnx-fp32"]["bytes"])
    # the same records, the same eval path: the float graph scores as the float model does
    assert rows["onnx-fp32"]["score"] == rows["fp32"]["score"]


def test_a_run_that_fails_half_way_leaves_no_output(assets, tmp_path, cli, monkeypatch):
    import graft.compress.compare as compare

    def broken(*args, **kwargs):
        raise GraftError("timing failed")

    monkeypatch.setattr(compare, "time_variants", broken)  # after the variants are built and scored
    out = tmp_path / "out"
    assert cli(*run_args(assets, out, "fp32,bf16")).error_line() == "error: timing failed"
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder next to it


def test_a_token_classifier_is_compared_on_entity_f1_as_graft_eval_scores_it(tmp_path, minilm, cli):
    import json

    from conftest import tiny_hf_config

    from graft.compress.compare import Settings, compress
    from graft.data import load_records
    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = tiny_hf_config("bert")
    cfg.vocab_size, cfg.id2label = 30522, dict(enumerate(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    hf = transformers.AutoModelForTokenClassification.from_config(cfg)
    with torch.no_grad():
        hf.classifier.bias[0] = 10.0  # "O" everywhere: half the tokens right, no entity found
    hf.save_pretrained(tmp_path / "ner")
    Tokenizer.from_folder(minilm).save(tmp_path / "ner")
    data = tmp_path / "test.conll"
    data.write_text(
        "Shahin B-PER\nSiadati I-PER\nlives O\nin O\nReykjavik B-LOC\n\nHello O\n", encoding="utf-8"
    )
    records = list(load_records(data))
    settings = Settings(texts=4, latency=2, rounds=1)
    variants = compress(
        tmp_path / "ner", parse_plan("fp32,int8-weight"), tmp_path / "out", records, settings=settings
    )
    expected = json.loads(cli("eval", tmp_path / "ner", "--data", data).ok().stdout)
    del expected["examples"]
    assert variants[0].metrics == expected and expected["accuracy"] == 0.5  # every metric, not only F1
    assert variants[0].score == expected["f1"] and variants[1].name == "int8-weight"
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        assert [r["metric"] for r in csv.DictReader(f)] == ["f1", "f1"]
