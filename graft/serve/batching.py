"""The token-budget queue of encoder requests (embeddings, classification, tagging, QA).

Requests wait in one queue; a worker thread takes the oldest and the waiting requests of the
same kind closest to it in length, as many as fit ``max_batch_tokens`` padded tokens, and runs
them (text-embeddings-inference's dynamic batching). Embeddings run packed, not padded
(packing.py), so a batch of mixed lengths costs about what its real tokens do.

When the worker is free it starts at once, unless ``start_at`` says the batch should wait for
company: while fewer requests are queued than the server knows of (those forwards just
answered: under load their clients come straight back) and the requests keep arriving, each
sooner after the last (the first, after the forward's end) than a forward's fixed cost, which the
queue measures on its own forwards (``ForwardCost``). Waiting for a request that comes within that time idles the model less than
the extra forward it would otherwise need; once the arrivals pause, or ``max_wait_ms`` after the
last forward ended, the batch runs. A lone client, the first request after a quiet spell and a
full batch never wait. (text-embeddings-inference and vLLM's pooling models never wait: the next
batch is cut whenever the model is free; Infinity holds a batch back while the previous one has
not started; vLLM's ``--scheduler-delay-factor`` delays new prompts by a multiple of the last
prompt step's time. Here the bound is the measured fixed cost, so it follows the model and the
machine.)

With ``overhead_tokens`` > 0 a batch runs as one or more forwards of texts of similar length
(``split``): padding every row to the batch's longest wastes about half the work on short texts of
mixed lengths (BBC titles and first sentences: 44% of a 32-text forward is real tokens, 54% after
the split), while each extra forward costs a fixed overhead, ``overhead_tokens`` padded tokens'
worth (about 30 for all-MiniLM-L6-v2 in one thread's CPU time). Off by default: with two torch
threads on cores the server shares with its clients, an extra forward cost more than it saved in
a run on a loaded machine; bench/serve.py measures both. Packed embeddings gain nothing from it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from graft.serve.metrics import Metrics

# run(op, items, options) -> one result per item
Runner = Callable[[str, list[Any], dict[str, Any]], list[Any]]
# prepare(op, each raw job's items) -> for each job, its items as ``run`` takes them and their
# lengths, or the error that refuses it
Preparer = Callable[[str, list[list[Any]]], list["tuple[list[Any], list[int]] | BaseException"]]
Outcome = tuple["Job", Any, BaseException | None]  # a job, and its results or its error


@dataclass
class Job:
    """One request: its items (texts or records) and each one's length in tokens."""

    op: str
    items: list[Any]
    lengths: list[int]
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop | None = None  # the future is this loop's (else a thread's Future)
    # raw: the items wait for the queue's ``prepare`` (texts to tokenize) and ``lengths`` are
    # estimates until then; the future's result is then (results, lengths)
    raw: bool = False
    future: Future | asyncio.Future = field(init=False)
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.future = Future() if self.loop is None else self.loop.create_future()
        self.ready = not self.raw

    def prepared(self, items: list[Any], lengths: list[int]) -> None:
        """A raw job's items as ``run`` takes them, and their real lengths."""
        self.items, self.lengths, self.ready = items, lengths, True
        for estimated in ("longest", "tokens"):
            self.__dict__.pop(estimated, None)  # (cached_property's values)

    @cached_property
    def key(self) -> Hashable:
        """Jobs batch together only when they ask for the same thing."""
        return self.op, tuple(sorted(self.options.items()))

    @cached_property
    def longest(self) -> int:
        return max(self.lengths, default=1)

    @cached_property
    def tokens(self) -> int:
        return sum(self.lengths)


def divide(batch: list[Job], n: int) -> list[list[Job]]:
    """The batch in at most ``n`` parts of about equal tokens (each job whole, the largest first
    into the part with the fewest tokens), none empty; a forward's time follows its tokens."""
    parts: list[list[Job]] = [[] for _ in range(min(n, len(batch)))]
    tokens = [0] * len(parts)
    for job in sorted(batch, key=lambda j: -j.tokens):
        i = tokens.index(min(tokens))
        parts[i].append(job)
        tokens[i] += job.tokens
    return parts


def padded(jobs: list[Job]) -> int:
    """Tokens a forward over ``jobs`` computes: every row padded to the longest."""
    return sum(len(j.items) for j in jobs) * max(j.longest for j in jobs)


def split(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """The rows (indices into ``lengths``) grouped into forwards at the least cost, where a forward
    costs ``overhead_tokens`` plus rows x its longest row; each group keeps the rows' order.

    The best groups are runs of the rows sorted by length, so the minimum is found over those runs
    by dynamic programming: O(n^2) for the n rows of one batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [None] * len(order)  # best[j]: the least cost of the j shortest rows
    start = [0] * (len(order) + 1)  # where the last group of the best split of those j begins
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]  # the longest of rows i..j-1 in sorted order
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * width
            if best[j] is None or cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(sorted(order[start[j] : j]))
        j = start[j]
    return sorted(groups)


class ForwardCost:
    """A forward's time as ``fixed`` seconds plus seconds per token, fitted (least squares) to the
    queue's last ``window`` forwards: the fixed part is what a batch saves by holding one more
    request rather than leaving it to a forward of its own."""

    def __init__(self, window: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        self.fixed = 0.0  # seconds a forward costs whatever it holds (0: not known yet)

    def record(self, tokens: int, seconds: float) -> None:
        """One more forward; the fit is redone here, once a forward, not at every decision."""
        self.samples.append((tokens, seconds))
        self.fixed = self.fit()

    def fit(self) -> float:
        """The fixed part of the forwards recorded; 0 until 8 forwards of different sizes say."""
        samples = self.samples
        if len(samples) < 8:
            return 0.0
        n = len(samples)
        mean_x, mean_y = sum(x for x, _ in samples) / n, sum(y for _, y in samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in samples)
        if var == 0:  # every forward the same size: the fixed part cannot be told apart
            return 0.0
        slope = sum((x - mean_x) * (y - mean_y) for x, y in samples) / var
        # a noisy fit (a busy machine) can say less than nothing or more than a whole forward
        return min(max(0.0, mean_y - slope * mean_x), min(y for _, y in samples))


NOW = 0.0  # start_at's answer for "start the batch at once" (any time already past would do)


def start_at(
    arrived: list[float], expected: int, full: bool, free_since: float, fixed: float, max_wait: float
) -> float:
    """When a free worker should start the batch of the queued requests that ``arrived`` (their
    arrival times, in seconds): ``NOW``, or a later time at which to look again (an arrival wakes
    it sooner). ``expected``: the requests the server knows of (those queued, and those forwards
    answered whose clients have not come back yet); ``full``: the queued ones fill the token budget;
    ``free_since``: when the last round's answers went out; ``fixed``: a forward's fixed cost in
    seconds.

    The batch waits while it is short of the requests expected and they keep coming, the last
    one less than ``fixed`` ago (or the answers went out less than that ago: the clients they
    answered cannot have come back before): one that arrives that soon idles the model less
    than the forward of its own it would otherwise need. Never more than ``max_wait`` after the
    answers went out; never for a full batch, for all the requests expected, or before the
    cost is known.
    """
    if full or len(arrived) >= expected or fixed <= 0:
        return NOW
    return min(max(*arrived, free_since) + fixed, free_since + max_wait)


class TokenBudgetQueue:
    def __init__(
        self,
        run: Runner,
        metrics: Metrics,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 20.0,
        batching: bool = True,
        overhead_tokens: int = 0,  # 0: each batch is one forward
        workers: int = 1,  # batches that run at once, each on a thread of its own
        threads: int = 0,  # torch threads in all (0: torch's count now); with workers > 1, see ``take``
        prepare: Preparer | None = None,  # what makes raw jobs ready, on worker 0 (``ready_raw``)
    ) -> None:
        import torch

        self.run, self.metrics, self.prepare = run, metrics, prepare
        self.threads = threads or torch.get_num_threads()
        self.overhead_tokens = overhead_tokens
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.batching = batching
        self.jobs: list[Job] = []
        self.rows, self.widest = 0, 0  # the queued jobs' texts, and the longest: padded(self.jobs), kept
        metrics.queue.set_function(lambda: len(self.jobs))  # read when scraped
        self.closed = False
        # start_at: answered requests whose clients have not come back yet (an arrival pays one
        # off), and when the last round's answers went out (``answered``)
        self.owed, self.free_since = 0, time.monotonic()
        self.sending = 0  # rounds whose answers an event loop is still writing
        self.costs: dict[str, ForwardCost] = {}  # each op's forwards
        self.free = workers  # workers not running a batch
        self.held: list[Outcome] = []  # the answers of a round's parts that have ended, until the last does
        self.holding = False  # worker 0 holds the next batch back for company (start_at): not idle
        self.shares: list[list[Job]] = [[] for _ in range(workers)]  # a round's part for each worker
        self.cond = threading.Condition()
        self.workers = [
            threading.Thread(target=self.serve, args=(i,), name=f"graft-encoder-queue-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self.workers:
            worker.start()

    def submit(
        self,
        op: str,
        items: list[Any],
        lengths: list[int],
        options: dict[str, Any],
        loop: asyncio.AbstractEventLoop | None = None,
        raw: bool = False,
    ) -> Future | asyncio.Future:
        """The job's future: an asyncio one of ``loop`` (called from that loop), else a thread's.
        ``raw``: the items are for the queue's ``prepare``, ``lengths`` an estimate of theirs; the
        future's result is then the results and the real lengths."""
        if raw and self.prepare is None:
            raise ValueError("raw jobs need a queue with a prepare function")
        job = Job(op, items, lengths, options, loop, raw)
        with self.cond:
            self.add(job)
            self.owed = max(0, self.owed - 1)
            if self.wakes():
                self.cond.notify_all()  # (with several workers, the idle one may not be the first woken)
        return job.future

    def add(self, job: Job) -> None:
        """``job`` queued (the lock held)."""
        self.jobs.append(job)
        self.rows, self.widest = self.rows + len(job.items), max(self.widest, job.longest)

    def wakes(self) -> bool:
        """Whether the job just queued must wake worker 0, which starts every round (``take``): the
        last round has ended and it is idle, or the batch it holds back for company has it now
        (every request expected, or the token budget full). Holding a batch, it wakes by itself
        when its wait ends and then sees every arrival, so an arrival that only moves that end on
        (most of them, under load) costs no thread switch; while a round runs, none wakes it."""
        if self.free < len(self.workers):
            return False
        return not self.holding or (
            self.owed == 0 or self.rows * self.widest >= self.max_batch_tokens
        )  # (every kind counted: at worst a wake for nothing)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for worker in self.workers:
            worker.join()

    def pick(self) -> list[Job]:
        """The oldest job ready to run, then those of its kind nearest to it in length while they fit
        the budget."""
        ready = [j for j in self.jobs if j.ready]
        first = ready[0]
        if not self.batching:
            return [first]
        others = [j for j in ready[1:] if j.key == first.key]
        others.sort(key=lambda j: abs(j.longest - first.longest))
        batch, rows, width = [first], len(first.items), first.longest  # padded(batch) = rows * width
        for job in others:
            more, wider = rows + len(job.items), max(width, job.longest)
            if more * wider <= self.max_batch_tokens:
                batch.append(job)
                rows, width = more, wider
        return batch

    def worth_waiting(self) -> float:
        """Seconds the next batch should still wait for company (0: run it now): ``start_at``;
        ``max_wait`` (then look again) while the last round's answers are still being written,
        unless the batch is full."""
        first = self.jobs[0]
        same = [j for j in self.jobs if j.key == first.key]
        full = padded(same) >= self.max_batch_tokens
        if self.sending and not full:
            return self.max_wait
        cost = self.costs.get(first.op)
        at = start_at(
            [j.arrived for j in same],
            len(same) + self.owed,
            full,
            self.free_since,
            cost.fixed if cost is not None else 0.0,
            self.max_wait,
        )
        return max(0.0, at - time.monotonic())

    def serve(self, worker: int = 0) -> None:
        import torch

        while (taken := self.take(worker)) is not None:
            batch, threads = taken
            torch.set_num_threads(threads)  # this thread's own count (OpenMP's is per thread)
            self.forward(batch)

    def take(self, worker: int = 0) -> tuple[list[Job], int] | None:
        """Worker ``worker``'s next batch and the torch threads it runs on; None when the queue is
        closed and nothing is left for it.

        The batches run in rounds. Worker 0 starts each one once the last has ended: it waits for
        company as ``start_at`` says, picks the batch, and with several workers splits it into
        one part each of about equal tokens (``divide``), every part on its share of the threads,
        so that they end together; the next round starts when every part has ended. A batch too
        small to divide leaves the other workers the next batch of another kind, and a round of one
        part runs on every thread (a lone request is answered as fast as one worker answers it).
        Two one-thread forwards at once compute up to 20% more tokens a second than one two-thread
        forward of the same texts (AMD EPYC, 4 to 64 texts), and a core taken by the event loop or
        a client slows one of them, not both (a forward on two threads waits for the slower at
        every operation). Workers that took batches of their own as they came free (before session
        19) drifted apart into groups of clients of unequal sizes, one forward waiting for its group
        to come back while the other ran: with rounds, p99 / p50 at half of saturation fell from
        2.91 to 2.34 (six runs each, 32 clients' throughput the same; AMD EPYC, AVX2).

        Only worker 0 ever runs on more than one thread: each thread that does keeps a team of
        OpenMP threads, and once those outnumber the cores, GNU OpenMP's threads stop spinning
        between parallel regions (its "throttled" spin) and every operation then waits for them
        to wake: a lone request's forward took 14 ms instead of 9 when both workers had run
        two-thread forwards."""
        share = max(1, self.threads // len(self.workers))  # a part's threads
        with self.cond:
            if worker > 0:  # its part of a round that worker 0 started
                while not self.shares[worker] and not self.closed:
                    self.cond.wait()
                batch, self.shares[worker] = self.shares[worker], []
                return (batch, share) if batch else None
            while True:
                while not self.may_start() and not (self.closed and not self.jobs):
                    self.cond.wait()
                if not self.may_start():  # closed, and nothing left to take
                    return None
                # only this worker takes jobs and starts rounds: what it waits for stays queued
                self.holding = True
                while self.batching and not self.closed and (left := self.worth_waiting()) > 0:
                    self.cond.wait(left)  # the arrival that completes the batch wakes it (wakes)
                self.holding = False
                # what is still owed then is forgotten: clients that did not come back by the time
                # a batch started have gone (at 64 clients, then 10, 54 would be owed for ever)
                self.owed = 0
                if self.ready_raw():  # (else every job there was refused: wait again)
                    break
            # (closing, the other workers may have gone: worker 0 runs what is left alone)
            n = 1 if self.closed else len(self.workers)
            parts: list[list[Job]] = []
            # a batch too small to divide leaves room for another kind's
            while len(parts) < n and any(j.ready for j in self.jobs):
                batch = self.pick()
                taken = {id(j) for j in batch}
                self.jobs = [j for j in self.jobs if id(j) not in taken]
                parts += divide(batch, n - len(parts))
            self.rows = sum(len(j.items) for j in self.jobs)
            self.widest = max((j.longest for j in self.jobs), default=0)
            self.free -= len(parts)
            if len(parts) == 1:
                return parts[0], self.threads
            for w, part in enumerate(parts[1:], 1):
                self.shares[w] = part
            self.cond.notify_all()
            return parts[0], share

    def may_start(self) -> bool:
        """Whether worker 0 may start a round now: requests wait and the last round has ended."""
        return bool(self.jobs) and self.free == len(self.workers)

    def ready_raw(self) -> bool:
        """The raw jobs queued now made ready by ``prepare`` (the lock held, and let go meanwhile),
        those it refuses answered with its error; whether any job is ready to run.

        The requests' tokenizing, done here rather than on the event loop: under load the loop's
        work between two rounds (answers out, requests in) is the time the model waits, and
        tokenizing was a fifth of it, while here one call of the tokenizer's batch encode takes
        every text of a round without the GIL (docs/serving.md). Requests arriving meanwhile stay
        queued, raw, for the next round."""
        raw = [j for j in self.jobs if not j.ready]
        if not raw:
            return True
        prepared: list[tuple[Job, tuple[list[Any], list[int]] | BaseException]] = []
        self.cond.release()
        try:
            for op in dict.fromkeys(j.op for j in raw):
                jobs = [j for j in raw if j.op == op]
                try:
                    made = self.prepare(op, [j.items for j in jobs])
                except Exception as e:  # a prepare that fails as a whole refuses them all
                    made = [e] * len(jobs)
                prepared += zip(jobs, made, strict=True)
        finally:
            self.cond.acquire()
        refused: list[Outcome] = []
        for job, result in prepared:
            if isinstance(result, BaseException):
                refused.append((job, None, result))
            else:
                job.prepared(*result)
        if refused:
            gone = {id(job) for job, _, _ in refused}
            self.jobs = [j for j in self.jobs if id(j) not in gone]
            answer_now(refused)
        return any(j.ready for j in self.jobs)

    def forward(self, batch: list[Job]) -> None:
        """Run the batch and answer its jobs once the round has ended: those of an event loop with
        one call into that loop per round (a call per request took 4% of the worker's time at 32
        clients).

        A part that ends before the others keeps its answers until the last part ends. Answered at
        once, its clients came back while the other forwards still ran, and the event loop's work
        for them (sending, reading, tokenizing) held the GIL that a forward takes back after every
        operation: two one-thread forwards beside a thread doing the loop's kind of work 7% of the
        time ran 7% fewer texts a second (docs/serving.md). Held, the loop works between rounds,
        when no forward waits for it (32 clients, 14 interleaved pairs: +7% requests a second,
        model CPU a text 5.15 -> 4.85 ms; AMD EPYC, Zen 4; with session 22's other changes,
        against session 21's code, +2% in 40 pairs)."""
        outcomes = self.outcomes(batch)
        with self.cond:  # before any answer, so that a client that comes straight back is counted
            # added, not set: with several workers, the clients of a batch that ended a moment
            # ago may still be coming back too (set, the second batch's end forgot them, and the
            # next batch could start, and be shared out, without them); with one worker the same
            # rule as before (wait for as many arrivals since the end as the batch held)
            self.owed += len(batch)
            self.free_since = time.monotonic()
            self.free += 1
            self.held += outcomes
            if self.free < len(self.workers) and not self.closed:
                return  # another part of the round still runs: the last to end answers for all
            outcomes, self.held = self.held, []
            answers: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
            for outcome in outcomes:
                if outcome[0].loop is not None:
                    answers.setdefault(outcome[0].loop, []).append(outcome)
            self.sending += len(answers)
            if len(self.workers) > 1:
                self.cond.notify_all()  # the round has ended: worker 0 may start the next
        settle([outcome for outcome in outcomes if outcome[0].loop is None])
        for loop, answered in answers.items():
            try:
                loop.call_soon_threadsafe(self.answer, loop, answered)
            except RuntimeError:  # the loop is closed: the server is stopping
                self.answered()

    def answer(self, loop: asyncio.AbstractEventLoop, outcomes: list[Outcome]) -> None:
        """On ``loop``: the round's answers, then (queued after the handlers they wake, so once those
        have written their responses) ``answered``.

        Until then no client can come back: a round that started before would leave them to the
        next. The loop took 3.7 ms to write 32 answers (a trace); at 64 clients, rounds started
        before all their requests were back, the rest waited a whole round, and rounds settled at
        about 46 of the 64 (23 texts a forward instead of 32; with this, 31)."""
        try:
            settle(outcomes)
        finally:  # whatever happens, the queue must not wait for these answers for ever
            loop.call_soon(self.answered)

    def answered(self) -> None:
        """A round's answers are out: start_at's clock starts now."""
        with self.cond:
            self.sending -= 1
            self.free_since = time.monotonic()
            self.cond.notify_all()

    def outcomes(self, batch: list[Job]) -> list[Outcome]:
        items = [item for job in batch for item in job.items]
        lengths = [n for job in batch for n in job.lengths]
        op, options = batch[0].op, batch[0].options
        results: list[Any] = [None] * len(items)
        try:
            groups = (
                split(lengths, self.overhead_tokens) if self.overhead_tokens else [list(range(len(items)))]
            )
            cost = self.costs.setdefault(op, ForwardCost())
            for rows in groups:
                began = time.perf_counter()
                answers = self.run(op, [items[i] for i in rows], options)
                cost.record(sum(lengths[i] for i in rows), time.perf_counter() - began)
                for i, result in zip(rows, answers, strict=True):
                    results[i] = result
                self.metrics.batch_size.labels(op).observe(len(rows))
                self.metrics.batch_tokens.labels(op).observe(sum(lengths[i] for i in rows))
        except Exception as e:  # one bad request must not fail the ones batched with it
            if len(batch) > 1:
                return [outcome for job in batch for outcome in self.outcomes([job])]
            return [(batch[0], None, e)]
        outcomes, start = [], 0
        for job in batch:
            answer = results[start : start + len(job.items)]
            outcomes.append((job, (answer, job.lengths) if job.raw else answer, None))
            start += len(job.items)
        return outcomes


def answer_now(outcomes: list[Outcome]) -> None:
    """Each job's result or error on its future, from any thread: through its event loop's queue
    for an asyncio future."""
    settle([outcome for outcome in outcomes if outcome[0].loop is None])
    for outcome in outcomes:
        if outcome[0].loop is not None:
            try:
                outcome[0].loop.call_soon_threadsafe(settle, [outcome])
            except RuntimeError:  # the loop is closed: nobody waits for it
                pass


def settle(outcomes: list[Outcome]) -> None:
    """Each job's result or error on its future (on the future's event loop, for an asyncio one)."""
    for job, result, error in outcomes:
        if job.future.done():  # cancelled: the client went away
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
