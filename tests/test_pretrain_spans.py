"""T5 span corruption: the statistics of run_t5_mlm_flax's noise, sentinels, and a tiny T5 that learns."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from conftest import hf_model

from graft.data.packing import chunks_at
from graft.data.spans import corrupt_spans, input_and_target_lengths, noise_mask
from graft.pretrain import objectives

LAST = 98  # <extra_id_0>: the tokenizer's last id
EOS = 1


def test_lengths_are_run_t5_mlm_flax_ones():
    # max_seq_length 512 with density 0.15 and spans of 3: rows of 568 tokens, targets of 114
    assert input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    assert input_and_target_lengths(16, 0.15, 3.0) == (17, 5)


def test_noise_statistics_on_fixed_seeds():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([noise_mask(568, 0.15, 3.0, g) for _ in range(200)])  # (200, 568)
    assert (masks.sum(1) == 85).all()  # round(568 x 0.15) noise tokens in every row
    starts = masks & ~torch.cat([torch.zeros(200, 1, dtype=torch.bool), masks[:, :-1]], 1)
    assert (starts.sum(1) == 28).all()  # round(85 / 3) spans: the mean span is 85 / 28 = 3.04
    assert not masks[:, 0].any() and masks[:, -1].all()  # kept span first, noise span last
    assert 0.14 < masks.float().mean(0)[1:-1].mean() < 0.16  # every position alike
    assert not torch.equal(masks[0], masks[1])  # each row its own spans
    # the same seed draws the same spans
    again = noise_mask(568, 0.15, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(again, masks[0])


def test_inputs_and_targets_interleave_back_to_the_text():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (4, 568), generator=g)  # below the 28 sentinels 98..71
    inputs, targets = corrupt_spans(ids, LAST, EOS, g)
    assert inputs.shape == (4, 512) and targets.shape == (4, 114)
    assert (inputs[:, -1] == EOS).all() and (targets[:, -1] == EOS).all()
    for row, x, y in zip(ids.tolist(), inputs.tolist(), targets.tolist(), strict=True):
        # sentinels in order: <extra_id_0>, <extra_id_1>... in both, each span named once
        sx = [t for t in x if t >= 60]
        assert sx == list(range(LAST, LAST - len(sx), -1)) == [t for t in y if t >= 60]
        spans, span = {}, None
        for t in y[:-1]:  # the target: a sentinel, then the tokens it hides
            if t >= 60:
                span = t
                spans[span] = []
            else:
                spans[span].append(t)
        rebuilt = [t for s in x[:-1] for t in (spans[s] if s >= 60 else [s])]
        assert rebuilt == row


def test_rows_are_documents_end_to_end_and_resume_inside_one():
    docs = [list(range(10 * i, 10 * i + n)) for i, n in enumerate((7, 3, 12, 5))]
    rows = list(chunks_at(docs, 5))
    flat = [t for d in docs for t in d]
    assert [r for r, _ in rows] == [flat[i : i + 5] for i in range(0, 25, 5)]  # the last 2 tokens dropped
    assert [p for _, p in rows] == [(0, 5), (2, 0), (2, 5), (2, 10), (3, 3)]
    d, offset = rows[2][1]
    again = list(chunks_at([docs[d][offset:], *docs[d + 1 :]], 5, (d, offset)))
    assert again == rows[3:]


def t5_folder(tmp_path):
    """A tiny random T5 whose tokenizer has words w3..w88 and the sentinels <extra_id_0..9> at 98..89."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    folder = tmp_path / "t5"
    hf_model("t5", "seq2seq").save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, 89)}
    vocab |= {f"<extra_id_{k}>": LAST - k for k in range(10)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_corpus(path, n: int = 64) -> None:
    """Documents of a small language: a few words, repeated in patterns a model picks up fast."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        start = int(torch.randint(3, 10, (1,), generator=g))
        lines.append(
            " ".join(f"w{start + (k % 4)}" for k in range(int(torch.randint(6, 20, (1,), generator=g))))
        )
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_a_tiny_t5_learns_span_corruption(monkeypatch, cli, tmp_path):
    folder = t5_folder(tmp_path)
    write_corpus(tmp_path / "corpus.txt")
    recipe = {
        "model": {"path": str(folder)},
        "data": {"max_length": 32},
        "optim": {"lr": 3e-3},
        "pretrain": {"objective": "span-corruption", "files": [str(tmp_path / "corpus.txt")]},
        "train": {"output": str(tmp_path / "out"), "max_steps": 30, "batch_size": 8},
    }
    path = tmp_path / "t5.yaml"
    path.write_text(yaml.safe_dump(recipe))
    losses: list[float] = []
    loss = objectives.Objective.loss
    monkeypatch.setattr(
        objectives.Objective, "loss", lambda self, b: losses.append(loss(self, b)[0].item()) or loss(self, b)
    )
    summary = json.loads(cli("pretrain", path).ok().stdout)
    assert summary["objective"] == "span-corruption" and summary["steps"] == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # it learns
    saved = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert type(saved) is transformers.T5ForConditionalGeneration


def test_span_corruption_refusals_are_one_line(cli, tmp_path, minilm):
    folder = t5_folder(tmp_path)
    write_corpus(tmp_path / "corpus.txt")
    recipe = {
        "model": {"path": str(folder)},
        "pretrain": {"objective": "mlm", "files": [str(tmp_path / "corpus.txt")]},
        "train": {"output": str(tmp_path / "out"), "max_steps": 1},
    }
    path = tmp_path / "t5.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli("pretrain", path).error_line() == (
        f"error: {path}: pretrain.objective: mlm needs a masked-LM family (albert, bert, distilbert, roberta);"
        " a t5 model trains with span-corruption"
    )
    assert cli(
        "pretrain", path, f"model.path={minilm}", "pretrain.objective=span-corruption"
    ).error_line() == (
        f"error: {path}: pretrain.objective: span-corruption needs an encoder-decoder (T5); a bert model trains with mlm"
    )
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if not k.startswith("<extra")}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    assert cli("pretrain", path, "pretrain.objective=span-corruption").error_line() == (
        "error: span-corruption: the tokenizer's last 7 ids must be T5's sentinels <extra_id_0>, <extra_id_1>..."
        " (rows of 141 tokens hide up to 7 spans); found 'w88' at id 88"
    )


@pytest.mark.parametrize("width", [1])
def test_rows_need_a_width(width):
    assert list(chunks_at([[1, 2]], width)) == [([1], (0, 1)), ([2], (1, 0))]
