"""Counterfactual bias probes (``graft fairness``) and per-group metrics (``graft eval --groups``)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_hf_config

from graft.tokenizer import Tokenizer

LABELS = ["negative", "positive"]
TEMPLATES = ["The {} worked as a nurse.", "{} said the doctor was late."]


def folder_of(tmp_path, minilm, cls, family: str = "bert", **config):
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.vocab_size = 30522
    cfg.initializer_range = 0.2
    for key, value in config.items():
        setattr(cfg, key, value)
    folder = tmp_path / cls.__name__
    cls(cfg).eval().save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    return folder


def test_classifier_shifts_equal_a_hand_computation(tmp_path, minilm, cli):
    folder = folder_of(
        tmp_path, minilm, transformers.BertForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    args = ["fairness", folder, "--groups", "he, she,they"]
    result = json.loads(cli(*args, *[a for t in TEMPLATES for a in ("--template", t)]).ok().stdout)
    ref = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    assert result["groups"] == ["he", "she", "they"]
    shifts = []
    for template, row in zip(TEMPLATES, result["templates"], strict=True):
        texts = [template.replace("{}", g) for g in ("he", "she", "they")]
        assert row["texts"] == texts
        with torch.no_grad():
            probs = ref(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)  # (3, 2)
        for i, g in enumerate(("he", "she", "they")):
            assert row["groups"][g] == pytest.approx(
                dict(zip(LABELS, probs[i].tolist(), strict=True)), abs=1e-5
            )
        for j, label in enumerate(LABELS):
            assert row["shift"][label] == pytest.approx(
                float(probs[:, j].max() - probs[:, j].min()), abs=1e-5
            )
        assert row["flipped"] == (len(set(probs.argmax(-1).tolist())) > 1)
        shifts.append(row["shift"]["positive"])
    assert result["summary"]["mean_shift"]["positive"] == pytest.approx(sum(shifts) / 2)
    assert result["summary"]["max_shift"]["positive"] == pytest.approx(max(shifts))


def test_causal_lm_log_likelihood_shift_equals_a_hand_computation(tmp_path, minilm, cli):
    folder = folder_of(tmp_path, minilm, transformers.GPT2LMHeadModel, family="gpt2")
    result = json.loads(cli("fairness", folder, "--template", TEMPLATES[0], "--groups", "he,she").ok().stdout)
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = Tokenizer.from_folder(folder)
    expected = {}
    for g in ("he", "she"):
        ids = tokenizer.encode(TEMPLATES[0].replace("{}", g), return_tensors=None).input_ids[0]
        ids = torch.tensor([ids])  # MiniLM's tokenizer has no eos: the sentence as it is ([CLS] ... [SEP])
        with torch.no_grad():
            logp = ref(ids).logits[0, :-1].log_softmax(-1)
        expected[g] = float(logp.gather(-1, ids[0, 1:, None]).sum())
    row = result["templates"][0]
    assert row["groups"]["he"]["log_likelihood"] == pytest.approx(expected["he"], abs=1e-3)
    assert row["groups"]["she"]["log_likelihood"] == pytest.approx(expected["she"], abs=1e-3)
    assert row["shift"]["log_likelihood"] == pytest.approx(abs(expected["he"] - expected["she"]), abs=1e-3)


def test_fairness_errors_are_one_line(tmp_path, minilm, cli):
    qa = folder_of(tmp_path, minilm, transformers.BertForQuestionAnswering)
    line = cli("fairness", qa, "--template", TEMPLATES[0], "--groups", "he,she").error_line()
    assert line == "error: fairness: the question-answering task is not supported (classification, causal-lm)"
    clf = folder_of(
        tmp_path, minilm, transformers.BertForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    line = cli("fairness", clf, "--template", "No slot here.", "--groups", "he,she").error_line()
    assert line == "error: --template 'No slot here.': no {} where the group word goes"
    line = cli("fairness", clf, "--template", TEMPLATES[0], "--groups", "he").error_line()
    assert line == "error: --groups 'he': give two or more comma-separated group words, e.g. he,she"
    line = cli(
        "fairness", clf, "--template", TEMPLATES[0], "--groups", "he,she", "--target", "postive"
    ).error_line()
    assert "--target 'postive' is not one of negative, positive" in line and "did you mean 'positive'" in line


def test_eval_groups_metrics_equal_eval_on_each_subset(tmp_path, minilm, cli):
    folder = folder_of(
        tmp_path, minilm, transformers.BertForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    rows = [
        ("A fine film.", "positive", "f"),
        ("Dull and long.", "negative", "m"),
        ("I loved it.", "positive", "m"),
        ("Not for me.", "negative", "f"),
        ("Great acting.", "positive", "f"),
        ("Terrible plot.", "negative", "m"),
        ("Quite good.", "positive", "x"),
    ]
    header = "review,label,gender\n"
    data = tmp_path / "all.csv"
    data.write_text(header + "".join(f"{t},{lab},{g}\n" for t, lab, g in rows), encoding="utf-8")
    got = json.loads(
        cli("eval", folder, "--data", data, "--column", "review=text", "--groups", "gender").ok().stdout
    )
    per = got["groups"]["per_group"]
    assert set(per) == {"f", "m", "x"}
    for g in per:
        subset = tmp_path / f"{g}.csv"
        subset.write_text(
            header + "".join(f"{t},{lab},{gg}\n" for t, lab, gg in rows if gg == g), encoding="utf-8"
        )
        alone = json.loads(cli("eval", folder, "--data", subset, "--column", "review=text").ok().stdout)
        assert per[g] == alone
    accuracy = {g: per[g]["accuracy"] for g in per}
    gap = got["groups"]["gaps"]["accuracy"]
    assert gap["gap"] == pytest.approx(max(accuracy.values()) - min(accuracy.values()))
    assert accuracy[gap["highest"]] == max(accuracy.values()) and accuracy[gap["lowest"]] == min(
        accuracy.values()
    )
    line = cli("eval", folder, "--data", data, "--column", "review=text", "--groups", "gendr").error_line()
    assert "column 'gendr': no such column" in line and "did you mean 'gender'" in line
