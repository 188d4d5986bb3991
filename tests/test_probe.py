"""Linear probes per layer with a control task (graft.interpret.probe, ``graft probe``)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from graft.interpret.probe import control_labels, layer_features, probe_layers
from graft.loading import load_model
from graft.tokenizer import Tokenizer

ANIMALS = ["cat", "dog", "horse", "sheep", "goat", "duck"]
TOOLS = ["hammer", "saw", "drill", "wrench", "chisel", "shovel"]
FILLER = ["the", "old", "man", "saw", "near", "a", "red", "house", "today", "quietly", "there", "was"]


def sentences(n: int = 96, seed: int = 0) -> list[dict[str, str]]:
    """Texts that name an animal or a tool among filler words; the property is which."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = "animal" if i % 2 else "tool"
        words = rng.sample(FILLER[:-3], 5)
        words.insert(rng.randrange(6), rng.choice(ANIMALS if kind == "animal" else TOOLS))
        rows.append({"text": " ".join(words), "kind": kind})
    return rows


def test_probe_reads_the_property_and_the_control_task_does_not(minilm):
    body, tokenizer = load_model(minilm, task="base", kernels=False), Tokenizer.from_folder(minilm)
    rows = sentences()
    result = probe_layers(body, tokenizer, [r["text"] for r in rows], [r["kind"] for r in rows], seed=0)
    assert [r["layer"] for r in result["layers"]] == list(range(7))  # embeddings + 6 blocks
    assert result["train"] + result["test"] == len(rows) and result["test"] == 24
    for r in result["layers"]:
        assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control"])
    best = result["layers"][result["best_layer"]]
    assert best["accuracy"] >= 0.9  # which kind of word a sentence names is linearly readable
    # random labels per distinct text cannot be learnt for texts never seen: chance, give or take
    assert max(r["control"] for r in result["layers"]) <= 0.75
    assert best["selectivity"] >= 0.25


def test_features_are_the_mean_of_each_layers_real_tokens(minilm):
    body, tokenizer = load_model(minilm, task="base", kernels=False), Tokenizer.from_folder(minilm)
    texts = ["a short one", "a rather longer sentence than the first"]
    features, owner = layer_features(body, tokenizer, texts, per_token=False, max_length=None)
    assert owner == [0, 1] and len(features) == 7
    enc = tokenizer.encode(texts[0])
    with torch.no_grad():
        out = body(enc.input_ids, enc.attention_mask, output_hidden_states=True)
    torch.testing.assert_close(features[3][0], out.hidden_states[3][0].mean(0), atol=1e-5, rtol=1e-5)
    # per token: the first piece of each word
    words = [["unbelievably", "good"], ["ok"]]
    features, owner = layer_features(body, tokenizer, words, per_token=True, max_length=None)
    assert owner == [0, 0, 1] and features[0].shape == (3, 384)


def test_control_labels_are_a_function_of_the_word_type_with_the_propertys_labels():
    words = [["The", "cat", "sat"], ["the", "dog", "sat"], ["a", "cat"]]
    tags = [["D", "N", "V"], ["D", "N", "V"], ["D", "N"]]
    control = control_labels(words, tags, per_token=True, seed=3)
    by_type = {}
    for ws, cs in zip(words, control, strict=True):
        for w, c in zip(ws, cs, strict=True):
            assert by_type.setdefault(w.lower(), c) == c
            assert c in {"D", "N", "V"}
    assert control == control_labels(words, tags, per_token=True, seed=3)


def test_graft_probe_per_token_writes_json_and_plot(tmp_path, minilm, cli):
    rng = random.Random(1)
    lines = []
    for _ in range(40):
        tokens = rng.sample(ANIMALS + TOOLS + FILLER, 6)
        pos = ["NOUN" if w in ANIMALS + TOOLS else "OTHER" for w in tokens]
        lines.append(json.dumps({"words": tokens, "pos": pos}))
    data = tmp_path / "words.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "probe"
    result = cli("probe", minilm, "--data", data, "--property", "pos", "--per-token", "--out", out).ok()
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "probe.json").read_text())
    assert printed["mode"] == "per_token" and printed["labels"] == ["NOUN", "OTHER"]
    assert printed["train"] + printed["test"] == 240
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["control"] <= 1 for r in printed["layers"])
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_graft_probe_errors_name_the_column(tmp_path, minilm, cli):
    data = tmp_path / "d.csv"
    data.write_text("text,kind\na cat,animal\na saw,tool\n", encoding="utf-8")
    line = cli("probe", minilm, "--data", data, "--property", "knd").error_line()
    assert "column 'knd': no such column" in line and "did you mean 'kind'" in line
    data.write_text("text,kind\na cat,animal\na dog,animal\n", encoding="utf-8")
    line = cli("probe", minilm, "--data", data, "--property", "kind").error_line()
    assert line == f"error: {data}, column 'kind': a probe needs at least two different values"
