"""The HTTP app of ``graft serve``: OpenAI-compatible endpoints, graft's own, limits and metrics.

The model loads in a thread after the server starts (/health says 503 until it is ready). Every
request that needs the model is admitted (at most ``max_concurrent`` at once, else 429), then
waits in the token-budget queue (encoders) or joins the continuous batch (causal LMs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, Literal

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import Field, ValidationError

from graft.data.packing import packable
from graft.errors import GraftError
from graft.serve.audio import register as register_audio
from graft.serve.batching import TokenBudgetQueue
from graft.serve.completions import register as register_completions
from graft.serve.continuous import ContinuousBatcher, RunningBatch
from graft.serve.explain import explainable
from graft.serve.explain import register as register_explain
from graft.serve.http import Body, HTTPError, check_token_ids, error, too_long
from graft.serve.metrics import Metrics
from graft.serve.model import Served
from graft.serve.packing import embed_packed, predict_packed
from graft.serve.tools import detect
from graft.tasks.base import TaskModel

log = logging.getLogger("graft")

ENDPOINTS = (
    "/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/rerank", "/predict", "/embed",
    "/v1/audio/transcriptions", "/v1/audio/translations",
    "/rerank", "/explain", "/tokenize", "/health", "/info", "/metrics", "/docs", "/openapi.json", "/",
)  # fmt: skip
OPEN = ("/health", "/", "/docs", "/openapi.json")  # no API key needed (the page asks for one)
# a path answered by the Gate from (the ASGI scope, the whole request body): a Response, or None for
# the app to answer
Shortcut = Callable[[dict, bytes], Awaitable[Response | None]]


@dataclass
class Settings:
    api_key: str | None = None
    max_batch_tokens: int = 16384
    max_wait_ms: float = 20.0  # an upper bound: batching.start_at decides
    forward_overhead_tokens: int = 0  # > 0: a batch runs as forwards of similar lengths (batching.split)
    max_concurrent: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    batching: bool = True
    # encoders: each batch in this many parts at once, each on cores / workers torch threads (batching.TokenBudgetQueue.take);
    # 0: two where the model runs on torch with two threads or more, else one
    workers: int = 0
    prefix_cache_mb: int = 256  # causal LMs: recent prompts' keys and values kept (0: none)
    # tool_choice "auto": the model's format for calls (graft.serve.tools.FORMATS; None: the one its
    # chat template names)
    tool_format: str | None = None
    # once the model is in, its objects leave the garbage collector's view (gc.freeze): graft serve's
    # process only, since the freeze is the whole process's
    freeze_gc: bool = False


@dataclass
class State:
    """What the app's handlers share: the model once loaded, the batchers, the counters."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    served: Served | None = None
    failure: str | None = None
    queue: TokenBudgetQueue | None = None
    engine: ContinuousBatcher | None = None
    draining: bool = False
    admitted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.metrics.in_flight.set_function(lambda: self.admitted)  # read when scraped, not set per request

    def admit(self, count: int = 1) -> None:
        """Count ``count`` more requests on the model (a completion's prompts), or refuse them (429)
        when that would take more than max_concurrent in; 413 for more than it ever takes at once."""
        limit = self.settings.max_concurrent
        if count > limit:
            raise HTTPError(
                413, f"prompt: {count} prompts; the server takes at most {limit} at once", "prompt"
            )
        with self.lock:
            if self.admitted + count > limit:
                raise HTTPError(429, f"the server is busy ({self.admitted} requests in flight); retry later")
            self.admitted += count

    def release(self, count: int = 1) -> None:
        with self.lock:
            self.admitted -= count

    def load(self, loader: Callable[[], Served]) -> None:
        try:
            served = loader()
        except GraftError as e:
            self.failure = str(e)
            return
        except Exception as e:  # a model that cannot load says so on /health and in the log
            log.exception("graft serve: loading failed")
            self.failure = f"{type(e).__name__}: {e}"
            return
        s = self.settings
        run = None
        if served.generates:
            self.engine = ContinuousBatcher(
                served.model, self.metrics, 64 if s.batching else 1, s.prefix_cache_mb << 20
            )
        else:
            run = partial(run_encoder, served, store=packed_store(served))  # run(op, items, options)
            self.queue = TokenBudgetQueue(
                run,
                self.metrics,
                s.max_batch_tokens,
                s.max_wait_ms,
                s.batching,
                s.forward_overhead_tokens,
                s.workers or (1 if served.exported else min(2, torch.get_num_threads())),
                prepare=lambda op, jobs: tokenize_texts(served, jobs),  # ("embed": the only raw op)
            )
        warm_up(served, run)
        if s.freeze_gc:
            # A full collection walks every object the process holds: after loading, torch's and the
            # model's (201,000 with all-MiniLM-L6-v2, 113 ms with the GIL held on an AMD EPYC; 318,000
            # and 195 ms before loading stopped importing torch._dynamo and sympy, graft.nn.init),
            # during which no request moves, once the first bursts of requests have allocated enough
            # to start one. Frozen, the objects alive now are never walked again (nor freed by the
            # collector: they live as long as the server); later collections see only what the
            # requests allocate.
            gc.collect()
            gc.freeze()
        self.served = served

    def call_format(self) -> str | None:
        """How the model writes tool calls (graft.serve.tools.FORMATS): --tool-format, else the one
        its chat template names; None where graft knows none."""
        return self.settings.tool_format or detect(getattr(self.model().tokenizer, "chat_template", None))

    def model(self) -> Served:
        if self.served is None:
            raise HTTPError(503, "the model is still loading" if self.failure is None else self.failure)
        return self.served

    async def on_queue(
        self, op: str, items: list[Any], lengths: list[int], options: dict[str, Any], raw: bool = False
    ) -> Any:
        """``op`` run on ``items`` by the encoder queue's thread (admitted first: 429 when full):
        the results; with ``raw``, items the queue prepares first and ``lengths`` a guess at theirs
        (``TokenBudgetQueue.submit``): the results and the real lengths."""
        if self.queue is None:
            raise HTTPError(400, f"/{op} needs an encoder; this server's model generates text")
        self.admit()
        try:
            return await self.queue.submit(op, items, lengths, options, asyncio.get_running_loop(), raw)
        finally:
            self.release()


# what the warm-up feeds the model: short, then long enough for more than 32 token rows when repeated
WARM_UP = (
    "graft serve warms up",
    "Its first forward packs the weights into the kernels' layout before any request waits for it.",
)


def warm_up(served: Served, run: Callable[[str, list[Any], dict[str, Any]], list[Any]] | None) -> None:
    """A first request's work, done before /health says ready: the first forward packs the weights
    into oneDNN's layout and creates its primitives (and, on a machine graft has not measured yet,
    times the kernels' routes: graft/kernels/calibrate.py), which the first request used to wait
    for (SmolLM2's first chat 1.8-2.7 s against 0.4 s for the next; all-MiniLM-L6-v2's first
    embedding 50 ms against 7-11, 210 ms where the routes were not measured yet). An encoder runs
    ``run`` (the queue's forward) on one input and on eight, the kernels' two classes of row
    counts at these lengths; a causal LM prefills a long prompt and a short one and decodes them
    alone and together. Models whose inputs it cannot make up (images, sound, sequence to
    sequence) start cold; a warm-up that fails is logged, and requests are served all the same."""
    task, tokenizer = served.task, served.tokenizer
    try:
        if served.generates:
            long = tokenizer.encode(
                " ".join(WARM_UP * 2), truncation=False, padding=False, return_tensors=None
            )
            prompt = long.input_ids[0][: served.max_length // 2] or [0]
            with torch.inference_mode():
                batch = RunningBatch(served.model)
                token = int(batch.prefill(prompt).argmax())  # a prompt alone (more than 32 rows)
                batch.step([token])  # one row
                batch.prefill(prompt[:8])  # a short one joins
                batch.step([token, token])  # two rows
            return
        if run is None:
            return
        for texts in ([WARM_UP[0]], list(WARM_UP) * 4):
            if task in ("base", "embedding"):
                rows = tokenizer.backend.encode_batch_fast(texts)
                run("embed", [(t, e.ids, e.type_ids) for t, e in zip(texts, rows, strict=True)], {})
            elif task in ("classification", "token-classification"):
                run("predict", [{"text": t} for t in texts], {})
            elif task == "question-answering":
                run("predict", [{"question": WARM_UP[0], "context": t} for t in texts], {})
    except Exception as e:
        log.warning(
            "graft serve: the warm-up failed (%s: %s); the first requests will pay for it",
            type(e).__name__,
            e,
        )


def packed_store(served: Served) -> dict | None:
    """Where the kernels keep the torch model's packed weights for every forward of the server: found
    once, as a served model's weights never change (finding it walks every parameter: 0.37 ms of
    one thread for all-MiniLM-L6-v2, a forward's fixed Python cost at each forward before)."""
    from graft.kernels import kernels_of

    k = None if served.exported else kernels_of(served.body)
    return k.store(served.body) if k is not None else None


def run_encoder(
    served: Served, op: str, items: list[Any], options: dict[str, Any], store: dict | None = None
) -> list[Any]:
    """One forward over a batch of texts (embed) or records (predict), on the queue's thread.
    ``store``: the packed weights (``packed_store``)."""
    from graft.export.backend import predictor
    from graft.tasks.collate import window
    from graft.tasks.embedding import embed

    if op == "explain":  # graft/serve/explain.py: attributions, one item at a time, on this thread
        from graft.serve.explain import explain_items

        return explain_items(served, items, options)
    if op == "generate":  # an encoder-decoder's new tokens for each prompt (items: its token ids)
        return seq2seq_generate(served, items, options)
    if op in ("embed-texts", "embed-images", "zero-shot"):  # CLIP (items: texts, or PIL images)
        return clip_run(served, op, items, options)
    if op == "transcribe":  # Whisper: each 30-second window's new tokens (items: its samples)
        t = served.transcriber
        return t.windows_tokens(t.features(items), options["language"], options["task"])
    if op == "embed":  # items: (text, token ids, segment ids), tokenized by the handler
        texts = [text for text, _, _ in items]
        limit = window(served.config, served.tokenizer)
        if served.exported:  # the export's runtime: graft embed's mean pooling (or the graph's own)
            vectors = served.model.embed(served.tokenizer, texts, len(texts), limit)
        elif packable(served.body):  # one forward over texts packed in rows, no padding (packing.py)
            ids, types = [row for _, row, _ in items], [row for _, _, row in items]
            vectors = embed_packed(served.body, ids, types, store)
        else:
            vectors = embed(
                served.body, served.tokenizer, texts, len(texts), limit, max_tokens=None, store=store
            )
        # (N, H) float32, unit length if asked: one call for the batch rather than one per request
        vectors = F.normalize(vectors, dim=-1) if options.get("normalize") else vectors
        return list(vectors.float().numpy())
    if not served.exported and isinstance(served.model, TaskModel) and packable(served.body):
        # the body on the records' real tokens alone (packing.py), when the head's batch packs
        predictions = predict_packed(served.model, served.tokenizer, items, store, **options)
        if predictions is not None:
            return predictions
    pairs = predictor(served.model)(served.processor or served.tokenizer, items, len(items), **options)
    return [prediction for _, prediction in pairs]


def token_rows(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text's token ids and segment ids, uncut: the backend's own batch call (what
    tokenizer.encode gives without truncation, minus the offsets and word ids, which took most of
    its time), which lets go of the GIL. A text it cannot take (a lone surrogate) raises
    tokenizer.encode's GraftError, which says why."""
    try:
        return [(e.ids, e.type_ids) for e in tokenizer.backend.encode_batch_fast(texts)]
    except Exception:
        tokenizer.encode(texts, truncation=False, padding=False, return_tensors=None)
        raise


def cut_to_window(
    tokenizer: Any,
    texts: list[str],
    rows: list[tuple[list[int], list[int]]],
    truncate: bool,
    names: list[str],
    limit: int,
) -> list[tuple[list[int], list[int]]]:
    """The texts' ``rows`` (``token_rows``) with any over ``limit`` tokens cut as the model's
    window cuts them (special tokens kept) when ``truncate``; else 413 for the first such text,
    named by ``names``."""
    for i, (ids, _) in enumerate(rows):
        if len(ids) <= limit:
            continue
        if not truncate:
            raise too_long(names[i], len(ids), limit, names[i].split("[")[0])
        cut = tokenizer.encode(texts[i], max_length=limit, padding=False, return_tensors=None)
        rows[i] = (cut.input_ids[0], cut.token_type_ids[0])
    return rows


def tokenize_texts(
    served: Served, jobs: list[list[Any]]
) -> list[tuple[list[Any], list[int]] | BaseException]:
    """The encoder queue's ``prepare`` of raw "embed" jobs, on its worker thread: each job's (text,
    truncate, name) items tokenized, every job's texts in one call (``token_rows``), as the (text,
    token ids, segment ids) items ``run_encoder`` takes and their lengths; a job with a text the
    model cannot take gets its error instead (the tokenizer's, or 413 over the window unless cut),
    and the others go on."""
    from graft.tasks.collate import window

    tokenizer, limit = served.tokenizer, window(served.config, served.tokenizer)
    try:
        rows = token_rows(tokenizer, [text for items in jobs for text, _, _ in items])
    except Exception as e:
        if len(jobs) == 1:
            return [e]
        return [made for items in jobs for made in tokenize_texts(served, [items])]
    made: list[tuple[list[Any], list[int]] | BaseException] = []
    start = 0
    for items in jobs:
        texts, names = [text for text, _, _ in items], [name for _, _, name in items]
        mine, start = rows[start : start + len(items)], start + len(items)
        try:
            mine = cut_to_window(tokenizer, texts, mine, items[0][1], names, limit)
        except HTTPError as e:
            made.append(e)
            continue
        made.append(([(t, *row) for t, row in zip(texts, mine, strict=True)], [len(ids) for ids, _ in mine]))
    return made


def clip_run(served: Served, op: str, items: list[Any], options: dict[str, Any]) -> list[Any]:
    """A CLIP model's batch: texts' or images' embeddings in the shared space, or zero-shot
    predictions of images against ``options``' labels and templates (graft zeroshot's)."""
    from graft.tasks.image_text import encode_images, encode_texts
    from graft.tasks.zeroshot import predictions, zero_shot_images

    clip, processor = served.model, served.processor
    if op == "embed-texts":
        return list(encode_texts(clip, processor.tokenizer, items, len(items), options["normalize"]).numpy())
    if op == "embed-images":
        return list(encode_images(clip, processor.images, items, len(items), options["normalize"]).numpy())
    labels = list(options["labels"])
    logits = zero_shot_images(clip, processor, items, labels, list(options["templates"]), len(items))
    return predictions(logits, labels)


# a streamed prompt's next token and whether it ends the row (end-of-text) -> whether its reader is still there
Sink = Callable[[int, bool], bool]


@dataclass
class Streamed:
    """A seq2seq prompt whose new tokens go to ``sink`` as they come (``stream: true``)."""

    ids: list[int]
    sink: Sink


def seq2seq_generate(
    served: Served, prompts: list[list[int] | Streamed], options: dict[str, Any]
) -> list[tuple[list[int], bool]]:
    """Each prompt's new tokens (up to, not including, end-of-text) from one generation over the
    batch, and whether it ended (end-of-text) rather than ran out of new tokens: the server's
    generation settings (generation_config.json), then ``options``; at most what the decoder's
    positions hold after its start token (as a causal LM's max_tokens stops at its window).

    With a ``Streamed`` prompt in the batch, the batch decodes step by step (graft.generation's
    ``stream``, the same tokens as ``generate``) and each streamed row's sink gets its tokens as
    they come, until its end-of-text; once no row's reader is left, the batch stops. Beam search
    has no step-by-step tokens: its rows come whole."""
    from graft.generation import GenerationConfig, generate, stream
    from graft.tasks.collate import pad, window

    config = GenerationConfig.for_model(served.model, served.generation_defaults, **options)
    room = window(served.config.decoder, None) - 1  # the decoder's positions; the start token takes one
    config = config.replace(max_new_tokens=min(config.max_new_tokens, room))
    sinks = [p.sink if isinstance(p, Streamed) else None for p in prompts]
    rows = [p.ids if isinstance(p, Streamed) else p for p in prompts]
    ids, mask = pad(rows, served.tokenizer.pad_token_id or 0, side="right")  # (N, T)
    if config.num_beams > 1 or not any(sinks):
        new = generate(served.model, ids, mask, config)[:, 1:].tolist()  # (N, new): after the start token
    else:
        new = [[] for _ in rows]
        reading = [sink is not None for sink in sinks]  # a streamed row whose reader is still there
        ended = [False] * len(rows)
        for tokens in stream(served.model, ids, mask, config):  # (N,) each row's next token
            for i, token in enumerate(tokens.tolist()):
                new[i].append(token)
                if reading[i] and not ended[i]:
                    reading[i] = sinks[i](token, token in config.eos_ids)
                ended[i] = ended[i] or token in config.eos_ids
            if not any(reading) and all(sinks):  # every row streamed, and every reader gone
                break
    ends = [next((i for i, t in enumerate(row) if t in config.eos_ids), None) for row in new]
    return [
        (row[:end], True) if end is not None else (row, False) for row, end in zip(new, ends, strict=True)
    ]


def failure(e: Exception, path: str) -> JSONResponse:
    """The answer to what a handler raised: its status (HTTPError), 422 (GraftError), else 500."""
    if isinstance(e, HTTPError):
        return error(e.status, e.message, e.param)
    if isinstance(e, GraftError):
        return error(422, str(e))
    log.error("graft serve: %s failed", path, exc_info=e)
    return error(500, f"internal error: {type(e).__name__}: {e}")


def json_response(content: Any) -> Response:
    """JSON written by orjson, numpy arrays included: the vectors' numbers are most of an answer's
    bytes, and FastAPI's own path (validate the returned value, then serialize) costs per number."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


# ---- request bodies (pydantic: /docs shows them, a bad field is a 422 that names it) ---------------


class EmbeddingsRequest(Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, or token ids (one list, or a list of lists), taken as they are."
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, ge=1, description="Shortened embeddings, for a model trained for them (Matryoshka)."
    )
    user: str | None = Field(None, description="OpenAI's end-user id: accepted, not used.")
    truncate: bool = Field(False, description="Cut texts longer than the model's window instead of a 413.")
    modality: Literal["text", "image"] = Field(
        "text", description="Infinity's: 'image' for a CLIP model's images (data URIs or base64)."
    )


class EmbedRequest(Body):
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool = False
    modality: Literal["text", "image"] = Field(
        "text", description="'image': a CLIP model's images (data URIs)."
    )


class PredictRequest(Body):
    inputs: str | dict[str, Any] | list[str | dict[str, Any]] = Field(
        description="A text, a record ({'text': ...}, {'question': ..., 'context': ...}) or a list of them."
    )
    truncate: bool = False
    threshold: float | None = None
    n_best: int | None = Field(None, ge=1)
    max_answer_length: int | None = Field(None, ge=1)
    null_threshold: float | None = None
    labels: list[str] | None = Field(
        None, min_length=1, description="A CLIP model: the labels to choose among."
    )
    templates: list[str] | None = Field(
        None,
        min_length=1,
        description="A CLIP model: prompts with {} for the label (default: graft zeroshot's).",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="A seq2seq model: tokens to generate at most.")
    num_beams: int | None = Field(None, ge=1, le=16, description="A seq2seq model: beam search's width.")


class RerankRequest(Body):
    """text-embeddings-inference's /rerank."""

    query: str
    texts: list[str] = Field(min_length=1, description="The texts to rank against the query.")
    raw_scores: bool = Field(False, description="A cross-encoder's logits instead of their sigmoid.")
    return_text: bool = False
    truncate: bool = False


class DocumentsRerankRequest(Body):
    """/v1/rerank: Cohere's and Jina's shape, as vLLM and Infinity serve it."""

    query: str
    documents: list[str] = Field(min_length=1, description="The documents to rank against the query.")
    model: str | None = None
    top_n: int | None = Field(None, ge=1, description="Only the best n (default: all).")
    return_documents: bool = True
    truncate: bool = False


class TokenizeRequest(Body):
    input: str | list[str]
    add_special_tokens: bool = True


# ---- the ASGI gate: metrics, errors, API key, draining, body size ---------------------------------


class Gate:
    """Outermost layer: counts every request by endpoint and status, times it, and turns away what
    must not reach the app (bad key 401, shutting down 503, body over the limit 413).

    ``shortcuts``: POST paths answered here from the whole body, without FastAPI's layers, unless
    the shortcut returns None (then the app answers as usual, from the same body).
    """

    def __init__(self, app: Any, state: State, shortcuts: dict[str, Shortcut] | None = None) -> None:
        self.app, self.state, self.shortcuts = app, state, shortcuts or {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            answer = self.refuse(scope, path)
            shortcut = self.shortcuts.get(path) if scope["method"] == "POST" else None
            if answer is None and (
                shortcut is not None or not any(k == b"content-length" for k, _ in scope["headers"])
            ):
                receive, answer, body = await self.buffered(receive)
                if answer is None and shortcut is not None and body is not None:
                    answer = await shortcut(scope, body)
            await (answer or self.app)(scope, receive, sending)
        finally:
            self.state.metrics.request(endpoint, str(status["code"]), time.perf_counter() - started)

    def too_large(self) -> Response:
        limit = self.state.settings.max_body_bytes
        return error(413, f"the request body is over the server's limit of {limit} bytes")

    def refuse(self, scope: dict, path: str) -> Response | None:
        s = self.state.settings
        wanted = (b"content-length", b"authorization", b"x-api-key")  # the headers read here, alone
        lowered = ((k.lower(), v) for k, v in scope["headers"])
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in lowered if k in wanted}
        if self.state.draining and path not in ("/health", "/metrics"):
            return error(503, "the server is shutting down", headers={"Connection": "close"})
        if s.api_key is not None and path not in OPEN:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), s.api_key.encode()):
                message = "a valid API key is required: send 'Authorization: Bearer KEY'"
                return error(401, message, headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > s.max_body_bytes):
            return self.too_large()
        return None

    async def buffered(self, receive: Callable) -> tuple[Callable, Response | None, bytes | None]:
        """The whole body, read up to the limit (413 beyond it: a chunked body has no Content-Length
        to refuse it by), and a ``receive`` that gives it to the app again; None: the client left."""
        limit = self.state.settings.max_body_bytes
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None, None  # the client left: the app sees the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, self.too_large(), None
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receiving() -> dict:
            return replay.pop() if replay else await receive()

        return receiving, None, body


# ---- the app ----------------------------------------------------------------------------------------


def create_app(loader: Callable[[], Served], settings: Settings | None = None) -> FastAPI:
    """The app; ``loader`` runs on a thread once the server is up (the model is ready when it returns)."""
    state = State(settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=state.load, args=(loader,), name="graft-load", daemon=True)
        thread.start()
        yield
        for worker in (state.queue, state.engine):
            if worker is not None:
                worker.close()

    app = FastAPI(
        title="graft serve",
        description="One loaded model: OpenAI-compatible endpoints, graft's predict/embed, metrics.",
        lifespan=lifespan,
    )
    app.state.graft = state

    async def failed(request: Request, e: Exception) -> JSONResponse:
        return failure(e, request.url.path)

    for kind in (HTTPError, GraftError, Exception):
        app.add_exception_handler(kind, failed)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors() or [{"loc": ("body",), "msg": "invalid request"}]
        # a union's branches each report: the one that got deepest into the value says most
        first = max(errors, key=lambda x: len(x.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error(
                422, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # a union's branches add their type names to the path: keep the field's own names
        loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "list", "dict")]
        name = ".".join(loc) or "body"
        return error(422, f"{name}: {first['msg']}", name)

    def served() -> Served:
        return state.model()

    def encoded(
        texts: list[str], truncate: bool, field_name: str | list[str], limit: int
    ) -> list[tuple[list[int], list[int]]]:
        """Each text's token ids and segment ids, tokenized here on the event loop (the texts of
        embeddings are tokenized on the queue's worker instead: ``tokenize_texts``); 413 for a text
        over ``limit`` tokens, unless it is to be cut (then as the model's window cuts it, special
        tokens kept). The error names the text ``field_name[i]``, or ``field_name[i]`` itself when
        a list names each text."""
        tokenizer = served().tokenizer
        return cut_to_window(
            tokenizer, texts, token_rows(tokenizer, texts), truncate, names_of(field_name, len(texts)), limit
        )

    def names_of(field_name: str | list[str], count: int) -> list[str]:
        """Each text's name in errors: ``field_name[i]``, or the list's own names."""
        return field_name if isinstance(field_name, list) else [f"{field_name}[{i}]" for i in range(count)]

    def lengths_of(texts: list[str], truncate: bool, field_name: str, limit: int) -> list[int]:
        return [len(ids) for ids, _ in encoded(texts, truncate, field_name, limit)]

    async def embeddings(
        texts: list[str], truncate: bool, name: str | list[str], normalize: bool, modality: str = "text"
    ) -> tuple[np.ndarray, int]:
        """(N, H) float32 embeddings of the texts (unit length if ``normalize``), and their tokens.
        ``name``: the texts' field, or each text's name (``names_of``). A CLIP model's ``modality``
        "image": the inputs are images (data URIs)."""
        s = encoder()
        if not texts:
            raise HTTPError(422, f"{name}: at least one text", name)
        if modality == "image" and not s.clip:
            raise HTTPError(422, f"modality: images need a CLIP model; {s.name} is {s.kind}", "modality")
        if s.clip:
            return await clip_embeddings(texts, truncate, str(name), normalize, modality)
        # tokenized on the queue's worker (tokenize_texts), not here on the event loop; the
        # lengths until then, for the queue's waiting, are a guess (about 4 characters a token)
        items = [(text, truncate, n) for text, n in zip(texts, names_of(name, len(texts)), strict=True)]
        guess = [len(text) // 4 + 2 for text in texts]
        vectors, lengths = await state.on_queue("embed", items, guess, {"normalize": normalize}, raw=True)
        return np.stack(vectors), sum(lengths)

    async def clip_embeddings(
        inputs: list[str], truncate: bool, name: str, normalize: bool, modality: str
    ) -> tuple[np.ndarray, int]:
        """(N, P) a CLIP model's embeddings of texts or images (data URIs) in the shared space, and
        the tokens read (an image: its patches and [CLS])."""
        from graft.serve.images import decode_image
        from graft.tasks.collate import window

        s = served()
        options = {"normalize": normalize}
        if modality == "image":
            images = [decode_image(v, f"{name}[{i}]", name) for i, v in enumerate(inputs)]
            per = s.config.vision.max_positions
            vectors = await state.on_queue("embed-images", images, [per] * len(images), options)
            return np.stack(vectors), per * len(images)
        lengths = [len(ids) for ids, _ in encoded(inputs, truncate, name, window(s.config.text, s.tokenizer))]
        vectors = await state.on_queue("embed-texts", inputs, lengths, options)
        return np.stack(vectors), sum(lengths)

    def encoder() -> Served:
        """The served model, unless it is a causal LM (a 400: embeddings are an encoder's)."""
        s = served()
        if not (s.reads_text or s.clip):
            raise HTTPError(400, f"{s.name} is {s.kind}: embeddings are for encoder models")
        return s

    async def generated(
        prompts: list[str] | list[list[int]],
        truncate: bool,
        name: str,
        options: dict[str, Any],
        sinks: list[Sink] | None = None,
    ) -> tuple[list[tuple[list[int], bool]], list[int]]:
        """A seq2seq model's new tokens for each prompt (a text, or token ids read as they are) and
        whether they ended (``seq2seq_generate``), and each prompt's length: 413 for one over the
        encoder's window, unless it is cut. Generated in batches by the queue (requests with the
        same options together); ``sinks``: one per prompt, given each new token as it comes."""
        from graft.tasks.collate import window

        s = served()
        limit = window(s.config.encoder, s.tokenizer)
        if prompts and isinstance(prompts[0], str):
            rows = [ids for ids, _ in encoded(prompts, truncate, name, limit)]
        else:
            rows = [list(ids[:limit]) if truncate else list(ids) for ids in prompts]
            for i, ids in enumerate(rows):
                if len(ids) > limit:
                    where = f"{name}[{i}]" if len(rows) > 1 else name
                    raise too_long(where, len(ids), limit, name)
        lengths = [len(ids) for ids in rows]
        items = (
            rows if sinks is None else [Streamed(ids, sink) for ids, sink in zip(rows, sinks, strict=True)]
        )
        return await state.on_queue("generate", items, lengths, options), lengths

    async def embedded(items: list[tuple], normalize: bool) -> tuple[np.ndarray, int]:
        """(N, H) float32 embeddings of the queue's (text, token ids, segment ids) items, and their tokens."""
        lengths = [len(ids) for _, ids, _ in items]
        vectors = await state.on_queue("embed", items, lengths, {"normalize": normalize})
        return np.stack(vectors), sum(lengths)

    async def id_embeddings(rows: list[list[int]], truncate: bool) -> tuple[np.ndarray, int]:
        """(N, H) unit embeddings of token-id lists, read as they are (no special tokens added, as
        OpenAI and text-embeddings-inference take them): the packed forward, which reads ids."""
        from graft.tasks.collate import window

        s = encoder()
        if s.exported or s.clip or not packable(s.body):
            raise HTTPError(
                400, f"{s.name}: token-id input needs a torch encoder whose texts pack; send text", "input"
            )
        limit, vocab = window(s.config, s.tokenizer), s.config.vocab_size
        for i, row in enumerate(rows):
            where = "input" if len(rows) == 1 else f"input[{i}]"
            if not row:
                raise HTTPError(422, f"{where}: no token ids", "input")
            check_token_ids(row, vocab, where, "input")
            if len(row) > limit and not truncate:
                raise too_long(where, len(row), limit, "input", cut="keep the first")
        return await embedded([(None, row[:limit], [0] * len(row[:limit])) for row in rows], normalize=True)

    def check_dimensions(dimensions: int) -> None:
        """422 unless the model's embeddings may be cut to ``dimensions`` (their own width, or one
        its config.json lists as trained for: ``matryoshka_dimensions``, or any with ``is_matryoshka``,
        as vLLM reads them)."""
        cfg = served().config
        width, hf = (cfg.projection_dim if served().clip else cfg.hidden_size), cfg.hf_config
        allowed = hf.get("matryoshka_dimensions") or []
        if dimensions == width or dimensions in allowed or (hf.get("is_matryoshka") and dimensions < width):
            return
        trained = (
            f"it was trained for {', '.join(map(str, allowed))}"
            if allowed
            else "it was not trained to be shortened (Matryoshka)"
        )
        raise HTTPError(
            422, f"dimensions: {served().name}'s embeddings have {width} values; {trained}", "dimensions"
        )

    @app.post("/v1/embeddings", tags=["OpenAI"], response_model=None)
    async def openai_embeddings(body: EmbeddingsRequest) -> Response:
        """OpenAI's embeddings: unit-length vectors, as floats or base64 float32."""
        given = (
            [body.input]
            if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int))
            else body.input
        )
        if body.dimensions is not None:
            check_dimensions(body.dimensions)
        if given and isinstance(given[0], list):  # token ids  (N, H) float32
            unit, tokens = await id_embeddings(given, body.truncate)
        else:  # (N, H) float32
            unit, tokens = await embeddings(given, body.truncate, "input", True, body.modality)
        if body.dimensions is not None and body.dimensions < unit.shape[1]:  # (N, d), unit length again
            unit = unit[:, : body.dimensions]
            unit = unit / np.linalg.norm(unit, axis=1, keepdims=True).clip(min=1e-12)
        if body.encoding_format == "base64":
            values: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in unit]
        else:  # float32 values written as the float64 numbers they are (what .tolist() gives)
            values = list(unit.astype("float64"))
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response({"object": "list", "data": data, "model": served().name, "usage": usage})

    async def quick_embeddings(scope: dict, body: bytes) -> Response | None:
        """POST /v1/embeddings answered by the Gate: the same handler on the same parsed body, without
        FastAPI's routing, body reading and dependency solving (the app's CPU per request 0.34 -> 0.14
        ms, one thread, HTTP aside: 40% of the event loop's at 32 clients). A body it does not take
        as it is (another content type, not JSON to orjson, an invalid field) is left to the app,
        whose 422 names the field."""
        kind = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if kind.split(b";")[0].strip().lower() != b"application/json":
            return None
        try:  # FastAPI's own validation of the parsed body (Python mode), orjson for json.loads
            request = EmbeddingsRequest.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError):
            return None
        try:
            return await openai_embeddings(request)
        except Exception as e:  # as the app's exception handlers answer
            return failure(e, scope["path"])

    @app.post("/embed", tags=["graft"], response_model=None)
    async def embed(body: EmbedRequest) -> Response:
        """Sentence embeddings (mean pooling), one list per text (text-embeddings-inference's shape)."""
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        vectors, _ = await embeddings(texts, body.truncate, "inputs", body.normalize, body.modality)
        return json_response(vectors.astype("float64"))

    async def relevance(
        query: str, texts: list[str], truncate: bool, raw_scores: bool, name: str
    ) -> tuple[list[float], int]:
        """Each text's relevance to the query, and the tokens read: a cross-encoder's (a classifier
        with one output, as cross-encoder/ms-marco-MiniLM-L-6-v2) sigmoid of its logit for the pair
        (or the logit itself with ``raw_scores``); an embedding model's cosine of the two texts'
        mean-pooled embeddings."""
        from graft.tasks.collate import window

        s = served()
        if s.task in ("base", "embedding"):
            names = ["query", *(f"{name}[{i}]" for i in range(len(texts)))]
            unit, tokens = await embeddings([query, *texts], truncate, names, normalize=True)  # (1 + N, H)
            return (unit[1:] @ unit[0]).tolist(), tokens
        problem = getattr(getattr(s.model, "head", None), "problem_type", None)
        if s.task != "classification" or problem != "regression" or len(s.labels or []) != 1:
            what = f" ({problem}, {len(s.labels or [])} labels)" if s.task == "classification" else ""
            raise HTTPError(
                400,
                f"{s.name} is a {s.task} model{what}: ranking needs a cross-encoder (a classifier "
                "with one output) or an embedding model",
            )
        records = [{"text": query, "text_pair": text} for text in texts]
        limit = window(s.config, s.tokenizer)
        pairs = s.tokenizer.encode(
            [query] * len(texts), texts, truncation=False, padding=False, return_tensors=None
        ).input_ids  # the pairs as the tokenizer joins them ([CLS] query [SEP] text [SEP] for BERT)
        lengths = [len(ids) for ids in pairs]
        for i, n in enumerate(lengths):
            if n > limit and not truncate:
                raise too_long(f"{name}[{i}] with the query", n, limit, name, cut="cut the longer of the two")
        lengths = [min(n, limit) for n in lengths]
        predictions = await state.on_queue("predict", records, lengths, {})
        logits = [p["value"] for p in predictions]
        return logits if raw_scores else torch.tensor(logits).sigmoid().tolist(), sum(lengths)

    @app.post("/rerank", tags=["graft"])
    async def rerank(body: RerankRequest) -> list[dict[str, Any]]:
        """The texts ranked by relevance to the query, best first (text-embeddings-inference's shape)."""
        scores, _ = await relevance(body.query, body.texts, body.truncate, body.raw_scores, "texts")
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [
            {"index": i, "score": scores[i]} | ({"text": body.texts[i]} if body.return_text else {})
            for i in ranked
        ]

    @app.post("/v1/rerank", tags=["OpenAI"])
    async def documents_rerank(body: DocumentsRerankRequest) -> dict[str, Any]:
        """The documents ranked by relevance to the query, best first (Cohere's and Jina's shape)."""
        scores, tokens = await relevance(body.query, body.documents, body.truncate, False, "documents")
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]
        results = [
            {"index": i, "relevance_score": scores[i]}
            | ({"document": {"text": body.documents[i]}} if body.return_documents else {})
            for i in ranked
        ]
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": served().name,
            "usage": {"total_tokens": tokens},
            "results": results,
        }

    @app.post("/predict", tags=["graft"])
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """The task model's predictions, one per input: the JSON lines of ``graft predict``."""
        from graft.tasks.collate import window
        from graft.tasks.predict import prediction_row

        s = served()
        if s.transcriber is not None:
            raise HTTPError(400, f"{s.name} is a speech model: send audio to /v1/audio/transcriptions")
        if s.task in ("base", "embedding", "causal-lm"):
            use = "/v1/chat/completions" if s.generates else "/embed"
            raise HTTPError(400, f"{s.name} has no prediction head ({s.task}); use {use}")
        inputs = body.inputs if isinstance(body.inputs, list) else [body.inputs]
        records = [{"text": r} if isinstance(r, str) else r for r in inputs]
        if not records:
            raise HTTPError(422, "inputs: at least one record", "inputs")
        generation = {"max_new_tokens": body.max_new_tokens, "num_beams": body.num_beams}
        given = next((k for k, v in generation.items() if v is not None), None)
        if s.processor is not None:  # images: graft predict's (ViT, DeiT) or graft zeroshot's (CLIP)
            return await image_predictions(body, inputs, given)
        for name in ("labels", "templates"):
            if getattr(body, name) is not None:
                raise HTTPError(422, f"{name}: for a CLIP model's zero-shot classification", name)
        if s.seq2seq:
            return await seq2seq_predictions(
                body, records, {k: v for k, v in generation.items() if v is not None}
            )
        if given is not None:
            raise HTTPError(422, f"{given}: only for a seq2seq model; {s.name} is {s.kind}", given)
        texts = []
        for i, r in enumerate(records):
            parts = [v for k, v in r.items() if k in ("text", "text_pair", "question", "context")]
            if not parts or not all(isinstance(p, str) for p in parts):
                expected = "'question' and 'context'" if s.task == "question-answering" else "'text'"
                raise HTTPError(422, f"inputs[{i}]: a record needs {expected} as text", "inputs")
            texts.append(" ".join(parts))
        # classification reads one window; tagging and QA slide windows over long texts
        limit = window(s.config, s.tokenizer) if s.task == "classification" else 10**9
        lengths = lengths_of(texts, body.truncate, "inputs", limit)
        exclude = {"inputs", "truncate", *generation}
        options = {k: v for k, v in body.model_dump(exclude=exclude).items() if v is not None}
        predictions = await state.on_queue("predict", records, lengths, options)
        return {"predictions": [prediction_row(r, p) for r, p in zip(records, predictions, strict=True)]}

    async def seq2seq_predictions(
        body: PredictRequest, records: list[dict[str, Any]], options: dict[str, Any]
    ) -> dict[str, Any]:
        """/predict on a seq2seq model: graft predict's {"generated": text} for each record's text,
        with ``options`` (max_new_tokens, num_beams)."""
        from graft.tasks.predict import prediction_row

        for name in ("threshold", "n_best", "max_answer_length", "null_threshold"):
            if getattr(body, name) is not None:
                raise HTTPError(422, f"{name}: not for a seq2seq model (max_new_tokens, num_beams are)", name)
        texts = []
        for i, r in enumerate(records):
            if not isinstance(r.get("text"), str):
                raise HTTPError(422, f"inputs[{i}]: a record needs 'text' as text", "inputs")
            texts.append(r["text"])
        rows, _ = await generated(texts, body.truncate, "inputs", options)
        decode = served().tokenizer.decode
        return {"predictions": [prediction_row(r, {"generated": decode(new)}) for r, (new, _) in zip(records, rows, strict=True)]}  # fmt: skip

    async def image_predictions(body: PredictRequest, inputs: list[Any], given: str | None) -> dict[str, Any]:
        """/predict on an image model: each input (a data URI, or a record with one as ``image``)
        classified as graft predict does, or, for CLIP, against the request's ``labels`` (each in
        each of ``templates``) as graft zeroshot does."""
        from graft.errors import GraftError
        from graft.serve.images import image_records
        from graft.tasks.predict import prediction_row
        from graft.tasks.zeroshot import DEFAULT_TEMPLATES, check_prompts

        s = served()
        if given is not None:
            raise HTTPError(422, f"{given}: only for a seq2seq model; {s.name} is {s.kind}", given)
        records = image_records(inputs, "inputs")
        if not records:
            raise HTTPError(422, "inputs: at least one image", "inputs")
        vision = s.config.vision if s.clip else s.config
        lengths = [vision.max_positions] * len(records)  # what an image costs: its patches and [CLS]
        if s.clip:
            if not body.labels:
                raise HTTPError(422, "labels: a CLIP model classifies against the labels you send", "labels")
            templates = body.templates or list(DEFAULT_TEMPLATES)
            try:
                check_prompts(body.labels, templates)
            except GraftError as e:
                raise HTTPError(422, str(e).replace("zero-shot: ", ""), "labels") from None
            options = {"labels": tuple(body.labels), "templates": tuple(templates)}
            predictions = await state.on_queue("zero-shot", [r["image"] for r in records], lengths, options)
        else:
            for name in ("labels", "templates", "n_best", "max_answer_length", "null_threshold"):
                if getattr(body, name) is not None:
                    raise HTTPError(422, f"{name}: not for an image classifier", name)
            options = {"threshold": body.threshold} if body.threshold is not None else {}
            predictions = await state.on_queue("predict", records, lengths, options)
        return {"predictions": [prediction_row(r, p) for r, p in zip(records, predictions, strict=True)]}

    @app.post("/tokenize", tags=["graft"])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Token ids and token strings of each text."""
        s = served()
        if s.tokenizer is None:
            raise HTTPError(400, f"{s.name} is {s.kind}: it reads images, not tokens")
        texts = [body.input] if isinstance(body.input, str) else body.input
        enc = s.tokenizer.encode(
            texts,
            truncation=False,
            padding=False,
            return_tensors=None,
            add_special_tokens=body.add_special_tokens,
        )
        ids = [list(row) for row in enc.input_ids]
        return {"ids": ids, "tokens": [s.tokenizer.convert_ids_to_tokens(row) for row in ids]}

    # ---- about the server ----

    @app.get("/v1/models", tags=["OpenAI"])
    async def models() -> dict[str, Any]:
        s = served()
        entry = {"id": s.name, "object": "model", "created": 0, "owned_by": "graft"}
        return {"object": "list", "data": [entry]}

    @app.get("/health", tags=["server"])
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while it loads, after it failed, or while shutting down."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.served is None:
            status = "loading" if state.failure is None else "failed"
            return JSONResponse({"status": status, "error": state.failure}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/info", tags=["server"])
    async def info() -> dict[str, Any]:
        """The model (family, task, labels, window) and the server's batching settings."""
        s = served()
        st = state.settings
        batching = {"enabled": st.batching, "max_batch_tokens": st.max_batch_tokens,
                    "max_wait_ms": st.max_wait_ms, "max_concurrent": st.max_concurrent,
                    "forward_overhead_tokens": st.forward_overhead_tokens,
                    "workers": len(state.queue.workers) if state.queue is not None else 1}  # fmt: skip
        if state.queue is not None:  # what a batch may wait for (batching.start_at), as measured so far
            costs = dict(state.queue.costs)
            batching["forward_fixed_ms"] = {op: round(1000 * cost.fixed, 3) for op, cost in costs.items()}
        # tool_choice "auto": the format for calls the model is read in (None: "auto" is refused)
        calls = state.call_format() if s.generates else None
        return {**s.info(), "batching": batching, "auth": st.api_key is not None, "explain": explainable(s),
                "tool_format": calls}  # fmt: skip

    @app.get("/metrics", tags=["server"])
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    register_explain(app, state)  # POST /explain (graft/serve/explain.py)
    register_audio(app, state)  # POST /v1/audio/transcriptions, /v1/audio/translations (audio.py)
    # POST /v1/completions, /v1/chat/completions (completions.py; a seq2seq model's through ``generated``)
    register_completions(app, state, generated)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("graft.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    return Gate(app, state, {"/v1/embeddings": quick_embeddings})
