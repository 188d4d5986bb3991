"""``graft icl``: in-context few-shot from the command line prints what graft.fewshot.icl computes,
for random and nearest examples; every bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_fewshot import FOOD, POOL, POOL_LABELS, SPORT, TEXTS, chat_model  # noqa: F401  (chat_model: a fixture)
from test_llama import smollm  # noqa: F401  (a fixture: SmolLM2-135M-Instruct converted from GGUF)

from graft.fewshot import icl_scores
from graft.fewshot.icl import random_examples
from graft.loading import load_model
from graft.rag import Embedder
from graft.tokenizer import Tokenizer

CLASSES = ["a", "b", "c"]
VERBALIZERS = ["w60", "w61 w62", "w63"]


def write_examples(path, texts=POOL, labels=POOL_LABELS, key="label"):
    path.write_text(
        "".join(json.dumps({"text": t, key: y}) + "\n" for t, y in zip(texts, labels, strict=True))
    )
    return path


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.ok().stdout.splitlines()]


def scores_of(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["scores"][c] for c in CLASSES] for r in rows])  # (N, L)


def test_random_examples_print_the_library_scores(chat_model, cli, tmp_path):  # noqa: F811
    examples = write_examples(tmp_path / "examples.jsonl")
    pairs = [arg for c, v in zip(CLASSES, VERBALIZERS, strict=True) for arg in ("--verbalizers", f"{c}={v}")]
    texts = [arg for t in TEXTS for arg in ("--text", t)]
    rows = lines(cli("icl", chat_model, "--examples", examples, "--labels", "a,b,c", "--k", "2", "--seed", "3",
                     *pairs, *texts))  # fmt: skip
    model, tokenizer = load_model(chat_model).eval(), Tokenizer.from_folder(chat_model)
    expected = icl_scores(model, tokenizer, TEXTS, POOL, POOL_LABELS, CLASSES, VERBALIZERS, k=2, seed=3)
    assert [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [CLASSES[i] for i in expected.argmax(-1).tolist()]
    torch.testing.assert_close(scores_of(rows), expected.softmax(-1), atol=1e-7, rtol=0)
    # --seed reaches the draw: another seed, other examples, the library's scores for them
    assert random_examples(POOL_LABELS, CLASSES, 2, seed=4) != random_examples(
        POOL_LABELS, CLASSES, 2, seed=3
    )
    other = lines(cli("icl", chat_model, "--examples", examples, "--labels", "a,b,c", "--k", "2", "--seed", "4",
                      *pairs, *texts))  # fmt: skip
    expected = icl_scores(model, tokenizer, TEXTS, POOL, POOL_LABELS, CLASSES, VERBALIZERS, k=2, seed=4)
    torch.testing.assert_close(scores_of(other), expected.softmax(-1), atol=1e-7, rtol=0)


def test_similar_examples_from_a_data_file_and_a_verbalizer_file(chat_model, minilm, cli, tmp_path):  # noqa: F811
    examples = write_examples(tmp_path / "examples.jsonl")
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    verbalizers = tmp_path / "verbalizers.txt"
    verbalizers.write_text("a=w60\n\nb=w61 w62\n")  # c from the command line
    rows = lines(cli("icl", chat_model, "--examples", examples, "--labels", "a,b,c", "--k", "1", "--select", "similar",
                     "--encoder", minilm, "--verbalizers", verbalizers, "--verbalizers", "c=w63", "--data", data))  # fmt: skip
    model, tokenizer = load_model(chat_model).eval(), Tokenizer.from_folder(chat_model)
    embedder = Embedder(minilm)
    expected = icl_scores(model, tokenizer, TEXTS, POOL, POOL_LABELS, CLASSES, VERBALIZERS, k=1, select="similar",
                          encode=lambda texts: torch.from_numpy(embedder.embed(texts)))  # fmt: skip
    assert [r["id"] for r in rows] == ["n0", "n1", "n2"]
    torch.testing.assert_close(scores_of(rows), expected.softmax(-1), atol=1e-7, rtol=0)


ERRORS = [
    # (arguments besides the model, examples and texts; the error line after "error: ")
    (["--labels", "a,b,c", "--k", "3"], "{examples}: class 'c' has 2 examples, fewer than --k 3 (lower --k or add examples of it)"),
    (["--labels", "a,b", "--k", "1"], "{examples}, line 7, column 'label': label 'c' is not one of --labels (a, b)"),
    (["--labels", "a,b,c", "--select", "similar"], "icl --select similar: needs a sentence encoder to find the nearest examples (--encoder MODEL)"),
    (["--labels", "a,b,c", "--select", "similar", "--encoder", "M", "--seed", "1"], "icl --seed: --select similar draws nothing (each text's nearest examples are shown)"),
    (["--labels", "a,b,c", "--encoder", "M"], "icl --encoder: only --select similar uses a sentence encoder (add --select similar)"),
    (["--labels", "a,b,c", "--select", "similr"], "--select 'similr': one of random, similar; did you mean 'similar'?"),
    (["--labels", "a,b,c", "--verbalizers", "a=w60"], "--verbalizers: label 'b' has no verbalizer (add --verbalizers b=...)"),
    (["--labels", "a,b,c", "--verbalizers", "nowhere.txt"], "--verbalizers 'nowhere.txt': neither LABEL=WORDS nor an existing file"),
    (["--labels", "a,b,c", "--data", "{examples}"], "icl: give texts with --text (one or more) or --data FILE, not both"),
    # the labels' check is graft zeroshot's, named after the command it came from
    (["--labels", "a,a"], "icl: label 'a' is given twice"),
    (["--labels", "a,,b"], "icl: label 2 is empty (--labels a,b,c)"),
    (["--labels", " "], "icl: no labels given (--labels a,b,c)"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_bad_input_is_one_line(args, message, chat_model, cli, tmp_path):  # noqa: F811
    examples = write_examples(tmp_path / "examples.jsonl")
    args = [a.replace("{examples}", str(examples)) for a in args]
    line = cli("icl", chat_model, "--examples", examples, "--text", "w10", *args).error_line()
    assert line == "error: " + message.replace("{examples}", str(examples))


def test_bad_files_and_models_are_one_line(chat_model, minilm, cli, tmp_path):  # noqa: F811
    unlabelled = write_examples(tmp_path / "unlabelled.jsonl", key="topic")
    line = cli("icl", chat_model, "--examples", unlabelled, "--labels", "a,b,c", "--text", "w10").error_line()
    assert line.startswith(
        f"error: {unlabelled}, line 1, column 'label': no such column (available: 'text', 'topic')"
    )
    # the user's column names, mapped for the examples (and not looked for in --data, whose labels are not read)
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "w10"}\n')
    rows = lines(cli("icl", chat_model, "--examples", unlabelled, "--column", "topic=label", "--labels", "a,b,c",
                     "--k", "1", "--data", data))  # fmt: skip
    assert len(rows) == 1 and set(rows[0]["scores"]) == set(CLASSES)

    verbalizers = tmp_path / "verbalizers.txt"
    verbalizers.write_text("a=w60\nb w61\n")
    line = cli("icl", chat_model, "--examples", unlabelled, "--labels", "a,b", "--verbalizers", verbalizers,
               "--text", "w10").error_line()  # fmt: skip
    assert line == f"error: {verbalizers}, line 2: expected LABEL=WORDS, e.g. a=..."

    examples = write_examples(tmp_path / "examples.jsonl")
    line = cli(
        "icl", minilm, "--examples", examples, "--labels", "a,b,c", "--k", "1", "--text", "x"
    ).error_line()
    assert (
        line == f"error: icl: {minilm} is a bert model; in-context learning needs a chat model (a causal LM)"
    )
    plain = tmp_path / "plain"
    shutil.copytree(chat_model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    line = cli(
        "icl", plain, "--examples", examples, "--labels", "a,b,c", "--k", "1", "--text", "w10"
    ).error_line()
    assert line == (
        "error: icl: the tokenizer has no chat template (tokenizer_config.json chat_template); "
        "use a chat model (e.g. SmolLM2-135M-Instruct)"
    )


@pytest.mark.slow  # SmolLM2-135M-Instruct from its GGUF file
def test_smollm2_names_obvious_topics_from_the_command_line(smollm, minilm, cli, tmp_path):  # noqa: F811
    examples = tmp_path / "examples.csv"
    examples.write_text("text,label\n" + "".join(f'"{t}",sport\n' for t in SPORT[:2]) + "".join(f'"{t}",cooking\n' for t in FOOD[:2]))  # fmt: skip
    queries = ["The goalkeeper saved a penalty in the last minute.", "Fry the garlic, then add the tomatoes."]
    texts = [arg for t in queries for arg in ("--text", t)]
    for select in (["--select", "random"], ["--select", "similar", "--encoder", str(minilm)]):
        args = ["--examples", examples, "--labels", "cooking,sport", "--k", "1", *select, *texts]
        rows = lines(cli("icl", smollm, *args))
        assert [r["label"] for r in rows] == ["sport", "cooking"], (select, rows)
