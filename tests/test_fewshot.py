"""Zero-shot and few-shot classification (graft.fewshot): verbalizer scores and calibration equal a
hand computation, in-context prompts hold k examples per class, SetFit pairs are right and its
loss falls, and the command line gives one-line errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_llama import smollm  # noqa: F401  (a fixture: SmolLM2-135M-Instruct converted from GGUF)
from test_serve import chat_folder

from graft.errors import GraftError
from graft.fewshot import calibrate, causal_lm_scores, icl_scores, pairs
from graft.fewshot.icl import conversation, random_examples, similar_examples
from graft.fewshot.verbalizer import CONTENT_FREE, label_texts
from graft.loading import load_model
from graft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer (token i is the word 'w<i>') and a chat template."""
    return chat_folder(tmp_path_factory.mktemp("chat"))


TEXTS = ["w10 w11 w12", "w20", "w30 w31 w32 w33 w34"]


def hand_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt), one unpadded row, every position's full softmax."""
    ids = tokenizer.encode(prompt, padding=False, return_tensors=None).input_ids[0]
    cont = tokenizer.encode(
        " " + continuation, padding=False, add_special_tokens=False, return_tensors=None
    ).input_ids[0]
    logits = model(input_ids=torch.tensor([ids + cont])).logits[0].double()  # (T, V)
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize(
    "verbalizers", [["w40", "w41", "w42"], ["w40 w43", "w41", "w42 w44 w45"]], ids=["one-token", "several"]
)
def test_verbalizer_scores_and_calibration_equal_a_hand_computation(chat_model, verbalizers):
    folder = chat_model
    tokenizer = Tokenizer.from_folder(folder)
    model = load_model(folder, kernels=False).eval()
    template = "{text} w50"
    raw = causal_lm_scores(model, tokenizer, TEXTS, verbalizers, template, calibrated=False, batch_size=2)
    with torch.inference_mode():
        hand = torch.tensor(
            [[hand_logprob(model, tokenizer, f"{t} w50", v) for v in verbalizers] for t in TEXTS]
        )
        free = torch.tensor(
            [
                [hand_logprob(model, tokenizer, template.replace("{text}", t), v) for v in verbalizers]
                for t in CONTENT_FREE
            ]
        )
    torch.testing.assert_close(raw, hand.float(), atol=1e-5, rtol=0)

    # Zhao et al.: q = normalize(diag(p_cf)^-1 p), p_cf the mean label distribution of the content-free inputs
    p = hand.softmax(-1)
    p_cf = free.softmax(-1).mean(0)
    q = p / p_cf
    q = q / q.sum(-1, keepdim=True)
    calibrated = causal_lm_scores(model, tokenizer, TEXTS, verbalizers, template, batch_size=2)
    torch.testing.assert_close(calibrated.exp(), q.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(calibrate(hand, free).exp(), q.float(), atol=1e-6, rtol=0)


def test_calibration_removes_a_constant_label_bias():
    bias = torch.tensor([3.0, 0.0, -1.0])
    scores = torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]])
    content_free = torch.zeros(3, 3)
    # a bias the content-free inputs show as well is divided out: the unbiased distribution is left
    torch.testing.assert_close(
        calibrate(scores + bias, content_free + bias), scores.log_softmax(-1), atol=1e-6, rtol=0
    )


def test_label_texts_cover_every_label_once():
    labels = ["sport", "tech"]
    assert label_texts(labels, None, "--verbalizers", "verbalizer") == labels
    assert label_texts(labels, ["tech=computers", "sport=football"], "--verbalizers", "verbalizer") == [
        "football",
        "computers",
    ]
    with pytest.raises(
        GraftError, match=r"^--verbalizers: label 'tech' has no verbalizer \(add --verbalizers tech=\.\.\.\)$"
    ):
        label_texts(labels, ["sport=football"], "--verbalizers", "verbalizer")
    with pytest.raises(GraftError, match=r"'sprot' is not one of --labels; did you mean 'sport'\?$"):
        label_texts(labels, ["sprot=football", "tech=x"], "--verbalizers", "verbalizer")
    with pytest.raises(GraftError, match="expected LABEL=VERBALIZER"):
        label_texts(labels, ["football"], "--verbalizers", "verbalizer")


# ---- in-context learning ------------------------------------------------------------------------

POOL = ["w10", "w11", "w12", "w20", "w21", "w22", "w30", "w31"]
POOL_LABELS = ["a", "a", "a", "b", "b", "b", "c", "c"]


def test_random_examples_take_k_per_class_seeded():
    chosen = random_examples(POOL_LABELS, ["a", "b", "c"], 2, seed=3)
    assert Counter(POOL_LABELS[i] for i in chosen) == {"a": 2, "b": 2, "c": 2}
    assert chosen == random_examples(POOL_LABELS, ["a", "b", "c"], 2, seed=3)
    assert len(set(chosen)) == 6


def test_similar_examples_are_the_nearest_of_each_class_nearest_last():
    pool = torch.nn.functional.normalize(
        torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    query = pool[[4]] + 0.01  # next to example 4 (class b)
    [chosen] = similar_examples(
        torch.nn.functional.normalize(query, dim=-1), pool, POOL_LABELS, ["a", "b", "c"], 1
    )
    assert Counter(POOL_LABELS[i] for i in chosen) == {"a": 1, "b": 1, "c": 1}
    assert chosen[-1] == 4
    similarity = (pool @ torch.nn.functional.normalize(query, dim=-1).T).squeeze(1)
    for i in chosen:  # each is its class's nearest
        same = [j for j, label in enumerate(POOL_LABELS) if label == POOL_LABELS[i]]
        assert i == max(same, key=lambda j: float(similarity[j]))


def test_icl_scores_equal_the_chat_prompt_scored_by_hand(chat_model):
    tokenizer = Tokenizer.from_folder(chat_model)
    model = load_model(chat_model, kernels=False).eval()
    verbalizers = ["w60", "w61 w62", "w63"]
    scores = icl_scores(model, tokenizer, TEXTS[:2], POOL, POOL_LABELS, ["a", "b", "c"], verbalizers, k=1,
                        seed=1, instruction="w70 {labels}")  # fmt: skip
    examples = random_examples(POOL_LABELS, ["a", "b", "c"], 1, seed=1)
    answer = dict(zip("abc", verbalizers, strict=True))

    def row(text: str) -> list[float]:
        messages = conversation(
            "w70 w60, w61 w62, w63", [(POOL[i], answer[POOL_LABELS[i]]) for i in examples], text
        )
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out = []
        for v in verbalizers:
            cont = tokenizer.encode(
                v, padding=False, add_special_tokens=False, return_tensors=None
            ).input_ids[0]
            logprobs = model(input_ids=torch.tensor([ids + cont])).logits[0].double().log_softmax(-1)
            out.append(sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(cont)))
        return out

    with torch.inference_mode():
        hand = torch.tensor([row(t) for t in TEXTS[:2]])
        free = torch.tensor([row(t) for t in CONTENT_FREE])
    torch.testing.assert_close(scores, calibrate(hand, free), atol=1e-5, rtol=0)


def test_icl_needs_a_chat_template(tmp_path, chat_model):
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(chat_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_folder(folder)
    with pytest.raises(GraftError, match=r"^icl: the tokenizer has no chat template"):
        icl_scores(None, tokenizer, TEXTS, POOL, POOL_LABELS, ["a", "b", "c"], ["w1", "w2", "w3"], k=1)


# ---- SetFit ---------------------------------------------------------------------------------------


def test_pairs_are_positive_within_a_class_and_negative_across():
    texts = [f"t{i}" for i in range(7)]
    labels = ["x", "x", "x", "y", "y", "z", "z"]
    records = pairs(texts, labels, iterations=3, seed=5)
    assert len(records) == 2 * 3 * len(texts)
    label_of = dict(zip(texts, labels, strict=True))
    for r in records:
        same = label_of[r["text"]] == label_of[r["text_pair"]]
        assert r["label"] == (1.0 if same else 0.0)
        assert r["text"] != r["text_pair"]  # every class here has a second example
    assert Counter(r["text"] for r in records) == {
        t: 6 for t in texts
    }  # each text anchors 2 x iterations pairs
    assert Counter(r["label"] for r in records) == {1.0: 21, 0.0: 21}
    assert records == pairs(texts, labels, iterations=3, seed=5)
    assert records != pairs(texts, labels, iterations=3, seed=6)
    with pytest.raises(GraftError, match="at least two classes"):
        pairs(texts, ["x"] * 7)


SPORT = ["The striker scored twice in the final.", "The team won the league on Sunday.",
         "She ran the marathon in record time.", "The coach praised his defenders after the match."]  # fmt: skip
FOOD = ["Simmer the onions in butter until soft.", "This soup needs more salt and pepper.",
        "Bake the bread for forty minutes.", "Whisk the eggs with sugar and flour."]  # fmt: skip


def setfit_recipe(model, output, **train):
    from graft.train.config import Recipe

    recipe = Recipe()
    recipe.model.path = str(model)
    recipe.data.max_length = 32
    recipe.optim.lr = 2e-5
    recipe.train.output = str(output)
    recipe.train.batch_size = 8
    recipe.train.plots = False
    recipe.checkpoint.keep = 0
    recipe.checkpoint.save_model = False
    for key, value in train.items():
        setattr(recipe.train, key, value)
    return recipe


@pytest.mark.slow  # trains MiniLM
def test_setfit_loss_falls_and_predictions_survive_save_and_load(minilm, tmp_path):
    from graft.fewshot import SetFit, train_setfit
    from graft.fewshot.setfit import pair_loss

    texts, labels = SPORT + FOOD, ["sport"] * 4 + ["food"] * 4
    recipe = setfit_recipe(minilm, tmp_path / "run", epochs=2, seed=0)
    records = pairs(texts, labels, iterations=2, seed=0)  # the pairs train_setfit trains on
    tokenizer = Tokenizer.from_folder(minilm)
    before = pair_loss(load_model(minilm, task="embedding"), records, tokenizer, 32)
    tuned = train_setfit(recipe, texts, labels, iterations=2)
    after = pair_loss(tuned.encoder, records, tokenizer, 32)
    assert after < 0.5 * before, (before, after)
    assert tuned.classes == ["food", "sport"]
    queries = ["The goalkeeper saved a penalty.", "Fry the garlic and add the tomatoes."]
    assert tuned.predict(queries) == ["sport", "food"]
    logits = tuned.logits(queries)
    loaded = SetFit.load(tuned.save(tmp_path / "setfit"))
    torch.testing.assert_close(loaded.logits(queries), logits, atol=1e-5, rtol=0)
    assert loaded.classes == tuned.classes and loaded.max_length == 32


def test_setfit_head_equals_a_hand_fitted_logistic_regression():
    """The head minimizes sum CE + ||W||^2 / 2C: its gradient there is zero (scikit-learn's objective)."""
    from graft.fewshot.setfit import fit_logistic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    weight, bias = fit_logistic(x, y, 3)
    w, b = weight.double().requires_grad_(), bias.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x.double() @ w.T + b, y, reduction="sum") + w.square().sum() / 2
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4


def test_predict_and_eval_read_a_setfit_folder_as_a_classification_model(minilm, tmp_path, cli):
    """graft predict and graft eval on a SetFit folder: SetFit.predict's labels, the softmax of its
    logits as scores, the classification metrics; a bad --device and half a SetFit folder, one line."""
    from graft.fewshot import SetFit
    from graft.fewshot.setfit import HEAD_WEIGHTS, fit_logistic

    texts, labels = SPORT + FOOD, ["sport"] * 4 + ["food"] * 4
    classes = ["food", "sport"]
    untuned = SetFit(load_model(minilm, task="embedding"), Tokenizer.from_folder(minilm), classes,
                     torch.zeros(0), torch.zeros(0), 32)  # fmt: skip
    y = torch.tensor([classes.index(label) for label in labels])
    untuned.weight, untuned.bias = fit_logistic(untuned.embed(texts), y, 2)
    folder = untuned.save(tmp_path / "setfit")
    setfit = SetFit.load(folder)
    queries = ["The goalkeeper saved a penalty.", "Fry the garlic and add the tomatoes.", *texts]
    truth = ["sport", "food", *labels[:2], "food", *labels[3:6], "sport", *labels[7:]]  # two wrong on purpose
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": a}) + "\n" for t, a in zip(queries, truth, strict=True))
    )

    out = cli("predict", folder, "--input", data, "--batch-size", "3").ok().stdout
    rows = [json.loads(line) for line in out.splitlines()]
    expected = setfit.predict(queries)
    probs = setfit.logits(queries).softmax(-1)  # (N, C)
    assert [r["label"] for r in rows] == expected
    for row, p in zip(rows, probs, strict=True):
        assert row.keys() == {"label", "score", "scores"}
        assert row["scores"] == pytest.approx(dict(zip(classes, p.tolist(), strict=True)), abs=1e-6)
        assert row["score"] == pytest.approx(float(p.max()), abs=1e-6)

    metrics = json.loads(cli("eval", folder, "--data", data).ok().stdout)
    right = sum(a == b for a, b in zip(expected, truth, strict=True))
    assert metrics["examples"] == len(queries) and metrics["accuracy"] == pytest.approx(right / len(queries))
    assert metrics["confusion_matrix"]["labels"] == classes

    assert cli("eval", folder, "--data", data, "--device", "cpu").ok()
    # a device torch knows (meta: on every machine) that is not the CPU
    assert cli("predict", folder, "--input", data, "--device", "meta").error_line() == (
        f"error: --device meta: a SetFit folder ({folder}) predicts on the CPU; pass --device cpu"
    )
    (folder / HEAD_WEIGHTS).unlink()
    assert (
        cli("eval", folder, "--data", data).error_line().startswith(f"error: {folder}: not a SetFit folder")
    )


@pytest.mark.slow  # SmolLM2-135M-Instruct from its GGUF file
def test_smollm2_in_context_names_obvious_topics(smollm, minilm):  # noqa: F811
    """The real chat model, one example per class (drawn, or the nearest by MiniLM): each text of a
    clear topic gets its class."""
    tokenizer = Tokenizer.from_folder(smollm)
    model = load_model(smollm).eval()
    pool = SPORT[:2] + FOOD[:2]
    labels = ["sport", "sport", "cooking", "cooking"]
    queries = ["The goalkeeper saved a penalty in the last minute.", "Fry the garlic, then add the tomatoes."]
    from graft.tasks.embedding import embed

    encoder, encoder_tokens = load_model(minilm, task="base"), Tokenizer.from_folder(minilm)

    def encode(texts: list[str]) -> torch.Tensor:
        return embed(encoder, encoder_tokens, texts, normalize=True)

    for select in ("random", "similar"):
        scores = icl_scores(model, tokenizer, queries, pool, labels, ["cooking", "sport"], ["cooking", "sport"],
                            k=1, select=select, encode=encode)  # fmt: skip
        assert scores.argmax(-1).tolist() == [1, 0], (select, scores)
