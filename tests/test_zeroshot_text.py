"""``graft zeroshot`` on texts: a sentence encoder's similarities to label descriptions and a causal
LM's calibrated verbalizer scores, each equal to a hand computation; bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_fewshot import chat_model, hand_logprob  # noqa: F401  (chat_model: a fixture)

from graft.errors import GraftError
from graft.fewshot.verbalizer import CONTENT_FREE, text_model_kind
from graft.loading import load_model
from graft.models import FAMILIES
from graft.tasks.embedding import embed
from graft.tokenizer import Tokenizer

NEWS = ["The striker scored twice in the final.", "The new phone has a faster chip and more memory."]


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.ok().stdout.splitlines()]


def test_a_sentence_encoder_compares_texts_to_label_descriptions(minilm, cli):
    args = ["--labels", "sport,tech", "--descriptions", "tech=computers, phones and software"]
    rows = lines(cli("zeroshot", minilm, *args, "--text", NEWS[0], "--text", NEWS[1]))
    model, tokenizer = load_model(minilm, task="base", kernels=False), Tokenizer.from_folder(minilm)
    texts = embed(model, tokenizer, NEWS, normalize=True)  # (2, P)
    labels = embed(model, tokenizer, ["sport", "computers, phones and software"], normalize=True)  # (2, P)
    expected = (20 * texts @ labels.T).softmax(-1)
    assert [r["text"] for r in rows] == NEWS and [r["label"] for r in rows] == ["sport", "tech"]
    got = torch.tensor([[r["scores"]["sport"], r["scores"]["tech"]] for r in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_causal_lm_scores_calibrated_verbalizers_from_a_data_file(chat_model, cli, tmp_path):  # noqa: F811
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["w10 w11", "w20"]))
    )
    args = [
        "--labels",
        "a,b",
        "--verbalizers",
        "a=w40",
        "--verbalizers",
        "b=w41 w42",
        "--prompt",
        "{text} w50",
    ]
    rows = lines(cli("zeroshot", chat_model, *args, "--data", data))
    model, tokenizer = load_model(chat_model, kernels=False).eval(), Tokenizer.from_folder(chat_model)
    with torch.inference_mode():
        hand = torch.tensor([[hand_logprob(model, tokenizer, f"{t} w50", v) for v in ("w40", "w41 w42")] for t in ("w10 w11", "w20")])  # fmt: skip
        free = torch.tensor([[hand_logprob(model, tokenizer, f"{t} w50", v) for v in ("w40", "w41 w42")] for t in CONTENT_FREE])  # fmt: skip
    q = hand.softmax(-1) / free.softmax(-1).mean(0)
    q = q / q.sum(-1, keepdim=True)
    assert [r["id"] for r in rows] == ["0", "1"]  # ids are read as text, as graft predict does
    got = torch.tensor([[r["scores"]["a"], r["scores"]["b"]] for r in rows])
    torch.testing.assert_close(got, q.float(), atol=1e-5, rtol=0)

    uncalibrated = lines(cli("zeroshot", chat_model, *args, "--data", data, "--no-calibrate"))
    got = torch.tensor([[r["scores"]["a"], r["scores"]["b"]] for r in uncalibrated])
    torch.testing.assert_close(got, hand.softmax(-1).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "a,b", "--verbalizers", "a=w40"], "--verbalizers: label 'b' has no verbalizer (add --verbalizers b=...)"),
        (["--labels", "a,b", "--verbalizers", "c=w40", "--verbalizers", "b=w1"], "--verbalizers 'c=w40': 'c' is not one of --labels"),
        (["--labels", "a,b", "--prompt", "no place"], "--prompt 'no place': must hold the input's place once as {text}"),
        (["--labels", "a,b", "--descriptions", "a=x"], "is a causal LM, which scores --verbalizers after --prompt; the options for the other kind (such as --descriptions) do not apply"),
    ],
)  # fmt: skip
def test_bad_causal_lm_options_are_one_line_errors(chat_model, cli, args, message):  # noqa: F811
    assert message in cli("zeroshot", chat_model, *args, "--text", "w10").error_line()


def test_chat_needs_a_chat_template(chat_model, cli, tmp_path):  # noqa: F811
    folder = tmp_path / "plain"
    shutil.copytree(chat_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    line = cli("zeroshot", folder, "--labels", "a,b", "--chat", "--text", "w10").error_line()
    assert line == (
        "error: zeroshot --chat: the tokenizer has no chat template (tokenizer_config.json chat_template); "
        "use a chat model (e.g. SmolLM2-135M-Instruct)"
    )


def test_texts_and_a_data_file_are_one_or_the_other(minilm, cli, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "x"}\n')
    line = cli("zeroshot", minilm, "--labels", "a,b", "--text", "x", "--data", data).error_line()
    assert line == "error: zeroshot: give texts with --text (one or more) or --data FILE, not both"
    line = cli("zeroshot", minilm, "--labels", "a,b", "--verbalizers", "a=x", "--text", "x").error_line()
    assert "is a sentence encoder, which compares texts to --descriptions" in line


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_is_a_text_scorer_or_refused_in_one_line(name):
    family = FAMILIES[name]
    if family.encoder_decoder or family.dual_encoder or family.inputs != "tokens":
        with pytest.raises(
            GraftError, match=rf"^zeroshot --text: M is a {name} model; texts need a sentence encoder"
        ):
            text_model_kind(family, "M")
    else:
        assert text_model_kind(family, "M") == ("causal-lm" if family.decoder else "encoder")
