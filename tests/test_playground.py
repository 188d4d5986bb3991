"""The playground at / in a real headless browser (Debian's chromium, driven by playwright's
Python client): it types, submits, and reads what the page shows against graft predict's output
and graft's embeddings. Each test writes a screenshot to its tmp folder."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_hf_config
from test_serve import LABELS, Server, chat_folder

from graft.tokenizer import Tokenizer


def bars(page) -> dict[str, str]:
    """The page's bars, in the order shown: label -> the percentage written beside it."""
    rows = page.query_selector_all(".bar-row")
    return {r.get_attribute("data-label"): r.query_selector(".bar-value").inner_text() for r in rows}


def test_classification_shows_one_bar_per_label_with_graft_predicts_scores(tmp_path, minilm, cli, page):
    torch.manual_seed(0)
    cfg = tiny_hf_config("bert")
    cfg.vocab_size, cfg.id2label = 30522, dict(enumerate(LABELS))
    folder = tmp_path / "model"
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    text = "A fine film, truly."
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    expected = json.loads(cli("predict", folder, "--input", data).ok().stdout)

    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=classification]")
        page.fill("#text", text)
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "classification.png"))
        shown = bars(page)
    finally:
        server.close()
    assert shown == {label: f"{100 * p:.2f}%" for label, p in expected["scores"].items()}
    assert next(iter(shown)) == expected["label"]  # the best bar first


def test_embeddings_show_the_similarity_matrix(tmp_path, minilm, page):
    from graft.loading import load_model
    from graft.tasks.embedding import embed

    texts = ["A man is eating food.", "A man eats a meal.", "Stocks fell sharply on Monday."]
    vectors = embed(load_model(minilm, task="base"), Tokenizer.from_folder(minilm), texts, normalize=True)
    expected = vectors @ vectors.T  # (3, 3) cosine similarities
    server = Server(minilm, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=base]")
        page.fill("#text", "\n".join(texts))
        page.click("#submit")
        page.wait_for_selector("#matrix")
        page.screenshot(path=str(tmp_path / "embeddings.png"))
        cells = [[float(td.inner_text()) for td in tr.query_selector_all("td")] for tr in page.query_selector_all("#matrix tr")[1:]]  # fmt: skip
    finally:
        server.close()
    assert torch.tensor(cells) == pytest.approx(expected.round(decimals=3), abs=1.01e-3)


def test_chat_streams_the_reply(tmp_path, page):
    from test_serve import expected_reply

    folder = chat_folder(tmp_path / "chat")
    message = "w10 w20 w30"
    reply = expected_reply(folder, [{"role": "user", "content": message}], 128)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=causal-lm]")
        page.fill("#text", message)
        page.click("#submit")
        page.wait_for_selector("#reply[data-done=true]")
        page.screenshot(path=str(tmp_path / "chat.png"))
        shown = page.inner_text("#reply")
    finally:
        server.close()
    assert shown == reply


def test_tagging_highlights_entities_and_qa_marks_the_answer(tmp_path, minilm, cli, page):
    from test_serve import TAGS

    context = "Graft loads pretrained transformers. The book was written in Tehran by Shahin Siadati."
    record = {"question": "Where was the book written?", "context": context}
    text = "Shahin Siadati lives in Reykjavik and Paris"
    shown = {}
    for task, cls, config, inputs in (
        ("token-classification", "AutoModelForTokenClassification", {"id2label": dict(enumerate(TAGS))}, {"text": text}),
        ("question-answering", "AutoModelForQuestionAnswering", {}, record),
    ):  # fmt: skip
        torch.manual_seed(0)
        cfg = tiny_hf_config("bert")
        cfg.vocab_size = 30522
        for key, value in config.items():
            setattr(cfg, key, value)
        folder = tmp_path / task
        getattr(transformers, cls).from_config(cfg).save_pretrained(folder)
        Tokenizer.from_folder(minilm).save(folder)
        data = tmp_path / f"{task}.jsonl"
        data.write_text(json.dumps(inputs) + "\n")
        expected = json.loads(cli("predict", folder, "--input", data).ok().stdout)
        server = Server(folder, log=tmp_path / f"{task}.log")
        try:
            page.goto(server.url + "/")
            page.wait_for_selector(f"body[data-task={task}]")
            if task == "question-answering":
                page.fill("#question", record["question"])
                page.fill("#context", record["context"])
            else:
                page.fill("#text", text)
            page.click("#submit")
            page.wait_for_selector("#output[data-ready=true]")
            page.screenshot(path=str(tmp_path / f"{task}.png"))
            if task == "question-answering":
                shown[task] = (page.inner_text("mark.answer"), page.inner_text("#answer-text"))
                assert shown[task] == (context[expected["start"] : expected["end"]], expected["answer"])
                assert page.inner_text("#answered").replace("\n", "") == context
            else:
                spans = page.query_selector_all(".entity")
                got = [
                    (s.get_attribute("data-type"), s.evaluate("e => e.firstChild.textContent")) for s in spans
                ]
                assert got == [(e["type"], e["text"]) for e in expected["entities"]]
        finally:
            server.close()


def test_seq2seq_shows_what_graft_predict_generates(tmp_path, cli, page):
    from test_serve_seq2seq import seq2seq_folder

    folder = seq2seq_folder(tmp_path / "t5", "t5")
    text = "w5 w6 w7"
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    expected = json.loads(cli("predict", folder, "--input", data, "--max-new-tokens", "128").ok().stdout)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=seq2seq]")
        page.fill("#text", text)
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "seq2seq.png"))
        shown = page.inner_text("#generated")
    finally:
        server.close()
    assert shown == expected["generated"] and shown
