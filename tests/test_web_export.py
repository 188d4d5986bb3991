"""``graft export --format web``: a static folder served by a plain file server, opened in headless
Debian chromium (playwright's Python client), predicting 20 real texts in the browser alone; the
page's tokens equal graft's, its labels equal graft predict's and its scores stay within the
tolerances the export's manifest states."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_config
from test_serve import LABELS, TAGS

from graft.tokenizer import Tokenizer

# what BERT's normalizer and pre-tokenizer handle beyond plain English: accents, CJK, controls, long words
TRICKY = [
    "Café déjà vu — naïve résumé!",
    "東京は大きい都市",
    "tabs\tand\nnewlines\x00 ‘quotes’",
    "x" * 120,
    "emoji 🙂 ok.",
]
BOOK = Path(__file__).parents[1] / "bench" / "data" / "book-questions.jsonl"


def texts() -> list[str]:
    lines = BOOK.read_text(encoding="utf-8").splitlines()[:20]
    return [json.loads(line)["question"] for line in lines]


def tiny(folder: Path, minilm: Path, labels: list[str], kind: str, spread: float = 0.02) -> Path:
    """A tiny random BERT with MiniLM's tokenizer. ``spread`` is its weights' init std: at BERT's 0.02
    every text gets one label; at 0.3 (seed 0) two labels appear over the 20 texts and int8 moves
    no decision (checked by the test, so a changed seed fails loudly rather than silently)."""
    torch.manual_seed(0)
    cfg = tiny_hf_config("bert")
    cfg.vocab_size, cfg.id2label, cfg.initializer_range = 30522, dict(enumerate(labels)), spread
    getattr(transformers, f"AutoModelFor{kind}").from_config(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    return folder


class StaticServer:
    """python -m http.server on a free loopback port, serving ``folder``."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(folder),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:  # until it listens (or has died)
            assert self.process.poll() is None, "python -m http.server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                continue
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def test_the_page_predicts_20_texts_in_the_browser_as_graft_does(tmp_path, minilm, cli, page):  # noqa: F811
    from graft.export.runtime import Exported, softmax

    folder = tiny(tmp_path / "model", minilm, ["business", "sport", "tech"], "SequenceClassification", 0.3)
    out = tmp_path / "web"
    cli("export", folder, out, "--format", "web").ok()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "web" and manifest["int8"] is not None
    assert {
        "index.html",
        "model.onnx",
        "tokenizer.json",
        "labels.json",
        "ort-wasm-simd-threaded.wasm",
    } <= set(manifest["files"])
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    expected = [json.loads(line) for line in cli("predict", folder, "--input", data).ok().stdout.splitlines()]
    tokenizer = Tokenizer.from_folder(folder)

    server = StaticServer(out)
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=classification]")
        tokens = page.evaluate("texts => texts.map(t => window.graft.tokenize(t))", texts() + TRICKY)
        page.fill("#text", "\n".join(texts()))
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
        results = page.query_selector_all("#output .result")
        shown = [(r.get_attribute("data-label"), json.loads(r.get_attribute("data-scores"))) for r in results]
    finally:
        server.close()

    assert tokens == [tokenizer.backend.encode(t).ids for t in texts() + TRICKY]
    assert len({e["label"] for e in expected}) >= 2  # the model decides something
    assert [label for label, _ in shown] == [e["label"] for e in expected]
    tolerance = manifest["web"]["score_tolerance"]
    for (_, scores), e in zip(shown, expected, strict=True):
        assert scores == pytest.approx(e["scores"], abs=tolerance)
    # against onnxruntime on the same int8 graph, much closer
    exported = Exported(out)
    for text, (_, scores) in zip(texts(), shown, strict=True):
        probs = softmax(exported.run(exported.encode([text]))[0])[0]
        got = np.array([scores[label] for label in exported.labels])
        assert np.abs(got - probs).max() <= manifest["web"]["runtime_tolerance"]


def test_tasks_the_page_cannot_run_are_refused_in_one_line(tmp_path, minilm, cli):
    folder = tiny(tmp_path / "tagger", minilm, TAGS, "TokenClassification")
    line = cli("export", folder, tmp_path / "out", "--format", "web").error_line()
    assert line == (
        "error: --format web: the page runs classification and embedding models, not token-classification; "
        "use --format onnx (runtime.py) or graft serve"
    )
    assert not (tmp_path / "out").exists()


def test_a_missing_npm_is_one_line_when_onnxruntime_web_is_not_cached(tmp_path, minilm, cli, monkeypatch):
    from graft.export.web import ORT_WEB_VERSION

    folder = tiny(tmp_path / "model", minilm, LABELS, "SequenceClassification")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    line = cli("export", folder, tmp_path / "out", "--format", "web").error_line()
    cached = tmp_path / "cache" / "graft" / "web" / f"onnxruntime-web-{ORT_WEB_VERSION}"
    assert line == (
        f"error: --format web: npm is needed once to fetch onnxruntime-web {ORT_WEB_VERSION} into {cached} "
        "(apt-get install -y npm, or put its dist files there)"
    )
    assert not (tmp_path / "out").exists()


def test_the_page_embeds_as_graft_does_and_shows_the_similarity_matrix(tmp_path, minilm, cli, page):  # noqa: F811
    from graft.export import INT8_MIN_COSINE
    from graft.loading import load_model
    from graft.tasks.embedding import embed

    out = tmp_path / "web"
    cli(
        "export", minilm, out, "--format", "web", "--task", "embedding", "--pooling", "mean", "--normalize"
    ).ok()
    expected = embed(load_model(minilm, task="base"), Tokenizer.from_folder(minilm), texts(), normalize=True)
    server = StaticServer(out)
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=embedding]")
        page.fill("#text", "\n".join(texts()))
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "web-embeddings.png"), full_page=True)
        vectors = page.evaluate(
            "texts => window.graft.predict(texts).then(r => r.map(x => x.embedding))", texts()
        )
        cells = [[float(td.inner_text()) for td in tr.query_selector_all("td")] for tr in page.query_selector_all("#matrix tr")[1:]]  # fmt: skip
    finally:
        server.close()
    got = torch.nn.functional.normalize(torch.tensor(vectors), dim=-1)  # (20, 384)
    cosines = (got * expected).sum(-1)  # (20,) page vs graft, text by text
    assert cosines.min() >= INT8_MIN_COSINE  # the int8 check the manifest states
    assert torch.tensor(cells) == pytest.approx((got @ got.T).numpy().round(3), abs=1.01e-3)


def test_a_tokenizer_the_page_cannot_run_is_refused_in_one_line(tmp_path, minilm, cli):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    folder = tiny(tmp_path / "model", minilm, LABELS, "SequenceClassification")
    bpe = Backend(models.BPE(vocab={"<unk>": 0, "a": 1, "b": 2}, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.save(str(folder / "tokenizer.json"))
    line = cli("export", folder, tmp_path / "out", "--format", "web").error_line()
    assert line == (
        "error: --format web: the page tokenizes BERT-style WordPiece only; this tokenizer is BPE "
        "(normalizer None, pre-tokenizer ByteLevel); use --format onnx (runtime.py) or graft serve"
    )
    assert not (tmp_path / "out").exists()
