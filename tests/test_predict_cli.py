"""graft predict / graft eval on saved task models of every task: JSON lines out, metrics and plots.

Tests run main() in this process (the ``cli`` fixture); predict and eval each run once in a real process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_hf_config

from graft.tokenizer import Tokenizer

LABELS = ["negative", "positive"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def graft(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graft", *map(str, args)], capture_output=True, text=True)


def task_folder(tmp_path, minilm, cls, family: str = "bert", **config):
    """A random tiny task model with all-MiniLM-L6-v2's tokenizer, saved by transformers."""
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.vocab_size = 30522
    for key, value in config.items():
        setattr(cfg, key, value)
    folder = tmp_path / cls.__name__
    cls.from_config(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_predict_classification_equals_transformers_in_a_real_process(tmp_path, minilm):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    texts = ["A fine film, truly.", "Dull.", "Nothing happens for two hours and then it ends."]
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    result = graft("predict", folder, "--input", data)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]

    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        probs = ref(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert [r["label"] for r in rows] == [LABELS[i] for i in probs.argmax(-1)]
    for row, p in zip(rows, probs, strict=True):
        assert abs(row["score"] - p.max().item()) <= 1e-5
        assert set(row["scores"]) == set(LABELS)


def test_eval_writes_metrics_predictions_and_confusion_matrix_in_a_real_process(tmp_path, minilm):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    data = tmp_path / "test.csv"
    data.write_text(
        "review,label\nGreat!,positive\nBad.,negative\nFine,positive\nMeh,negative\n", encoding="utf-8"
    )
    out = tmp_path / "results"
    result = graft("eval", folder, "--data", data, "--column", "review=text", "--out", out)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert printed == saved and saved["examples"] == 4
    predicted = [json.loads(line)["label"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    gold = ["positive", "negative", "positive", "negative"]
    assert saved["accuracy"] == sum(p == g for p, g in zip(predicted, gold, strict=True)) / 4
    assert saved["confusion_matrix"]["labels"] == LABELS
    assert sum(map(sum, saved["confusion_matrix"]["matrix"])) == 4
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_and_eval_ner_on_conll(tmp_path, minilm, cli):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForTokenClassification, id2label=dict(enumerate(TAGS))
    )
    data = tmp_path / "test.conll"
    data.write_text(
        "Shahin B-PER\nSiadati I-PER\nlives O\nin O\nReykjavik B-LOC\n\nHello O\n", encoding="utf-8"
    )
    result = cli("predict", folder, "--input", data).ok()
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert (
        rows[0]["tokens"] == ["Shahin", "Siadati", "lives", "in", "Reykjavik"] and len(rows[0]["tags"]) == 5
    )
    text = " ".join(rows[0]["tokens"])
    assert all(text[e["start"] : e["end"]] == e["text"] for e in rows[0]["entities"])
    result = cli("eval", folder, "--data", data).ok()
    metrics = json.loads(result.stdout)
    assert {"precision", "recall", "f1", "accuracy"} <= set(metrics) and metrics["examples"] == 2


def test_predict_qa_on_squad_json_gives_answers_with_character_spans(tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForQuestionAnswering)
    context = "Graft loads pretrained transformers. " * 30 + "The book was written in Tehran."
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where was the book written?",
                                "answers": [{"text": "Tehran", "answer_start": context.index("Tehran")}],
                            }
                        ],
                    }
                ]
            }
        ]
    }
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(squad), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    result = cli(
        "predict", folder, "--input", data, "--output", out, "--max-length", "64", "--n-best", "3"
    ).ok()
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "q1" and len(row["answers"]) == 3
    assert context[row["start"] : row["end"]] == row["answer"]
    result = cli("eval", folder, "--data", data, "--max-length", "64").ok()
    assert {"exact_match", "f1"} <= set(json.loads(result.stdout))


def test_predict_generates_with_a_causal_lm(tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="gpt2")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "Once upon a time"}, {"text": "The end"}])
    result = cli("predict", folder, "--input", data, "--max-new-tokens", "5").ok()
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["generated"], str) for r in rows)  # random weights: any text
    result = cli("eval", folder, "--data", data).ok()
    assert json.loads(result.stdout)["perplexity"] > 1


def test_errors_are_one_line(tmp_path, minilm, cli):
    torch.manual_seed(0)
    bare = tmp_path / "bare"
    transformers.AutoModel.from_config(tiny_hf_config("bert")).save_pretrained(bare)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hi"}])
    line = cli("predict", bare, "--input", data).error_line()
    assert "bare" in line and "task head" in line

    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    data = write_jsonl(
        tmp_path / "unknown.jsonl", [{"text": "hi", "label": "positive"}, {"text": "x", "label": "meh"}]
    )
    line = cli("eval", folder, "--data", data).error_line()
    assert "unknown.jsonl, line 2, column 'label'" in line and "'meh'" in line
    line = cli("predict", folder, "--input", tmp_path / "nowhere.jsonl").error_line()
    assert "nowhere.jsonl" in line
    line = cli("predict", folder, "--input", data, "--column", "oops").error_line()
    assert "--column" in line


@pytest.mark.parametrize("pooling", ["mean"])
def test_predict_embeddings(tmp_path, minilm, pooling, cli):
    from graft.loading import load_model, save_model

    base = task_folder(tmp_path, minilm, transformers.AutoModel)
    save_model(
        load_model(base, task="embedding", pooling=pooling), tmp_path / "emb", Tokenizer.from_folder(minilm)
    )
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a cat"}, {"text": "a dog"}])
    result = cli("predict", tmp_path / "emb", "--input", data).ok()
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]["embedding"]) == 32
    assert abs(sum(x * x for x in rows[0]["embedding"]) - 1) < 1e-5


def test_predict_failing_midway_leaves_no_half_file(tmp_path, minilm, cli):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n', encoding="utf-8")
    streamed = cli("predict", folder, "--input", data, "--batch-size", "1")
    assert "in.jsonl" in streamed.error_line() and "line 3" in streamed.error_line()
    assert len(streamed.stdout.splitlines()) == 2  # the failure comes after two predictions

    out = tmp_path / "results" / "predictions.jsonl"
    cli("predict", folder, "--input", data, "--batch-size", "1", "--output", out).error_line()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    out.parent.mkdir(exist_ok=True)
    out.write_text("an earlier run's predictions\n")
    cli("predict", folder, "--input", data, "--batch-size", "1", "--output", out).error_line()
    assert list(out.parent.iterdir()) == [out] and out.read_text() == "an earlier run's predictions\n"
