"""graft.serve's batchers in this process: continuous batching gives each sequence what it gets
alone (greedy, every decoder family), and the token-budget queue batches within its budget."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import hf_model

from graft.generation import GenerationConfig, generate
from graft.loading import load_model
from graft.models import FAMILIES
from graft.serve.batching import NOW, ForwardCost, Job, TokenBudgetQueue, divide, split, start_at
from graft.serve.continuous import ContinuousBatcher, PrefixCache, Sequence, held_back
from graft.serve.metrics import Metrics

DECODERS = [name for name, family in FAMILIES.items() if family.decoder]


class Ids:
    """A tokenizer whose text is the ids themselves, so the text says which tokens came."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def run_all(
    model,
    jobs: list[tuple[list[int], GenerationConfig]],
    max_running: int = 64,
    metrics: Metrics | None = None,
):
    """Submit every job at once; each one's (text, finish event) once all are done. ``metrics``: a
    prefix cache too, counted there."""
    engine = ContinuousBatcher(model, metrics or Metrics(), max_running, 64 << 20 if metrics else 0)
    results = [[[], None] for _ in jobs]
    left = [threading.Event() for _ in jobs]

    def emitter(i):
        def emit(event):
            if event[0] == "text":
                results[i][0].append(event[1])
            else:
                results[i][1] = event

        return emit

    for i, (prompt, config) in enumerate(jobs):
        engine.submit(Sequence(prompt, config, Ids(), emitter(i), on_leave=left[i].set))
    for event in left:
        assert event.wait(timeout=600)
    engine.close()
    return [("".join(text), event) for text, event in results]


@pytest.mark.parametrize("family", DECODERS)
def test_continuous_batching_equals_each_sequence_alone(tmp_path, family):
    hf_model(family, "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="causal-lm")
    g = torch.Generator().manual_seed(3)
    # prompts of different lengths that finish at different steps: rows join, leave and pad
    jobs = [
        (
            torch.randint(3, 99, (n,), generator=g).tolist(),
            GenerationConfig(max_new_tokens=m, eos_token_id=[]),
        )
        for n, m in ((5, 12), (11, 4), (2, 9), (8, 15), (3, 1))
    ]
    got = run_all(model, jobs, max_running=3)  # five sequences, three rows at most: some wait and join later
    for (prompt, config), (text, event) in zip(jobs, got, strict=True):
        alone = generate(model, torch.tensor([prompt]), None, config)[0, len(prompt) :].tolist()
        assert text == Ids().decode(alone)
        assert event == ("done", "length", len(prompt), config.max_new_tokens)


@pytest.mark.parametrize("family", DECODERS)
def test_a_prompt_that_begins_as_a_kept_one_runs_from_where_they_part(tmp_path, family):
    """With the prefix cache, a prompt extending an earlier one (a chat's next turn) reads the kept
    keys and values of the shared beginning: the same tokens as each sequence alone."""
    hf_model(family, "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="causal-lm")
    g = torch.Generator().manual_seed(4)
    first = torch.randint(3, 99, (9,), generator=g).tolist()
    config = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    jobs = [
        (first, config),
        (first + [7, 8, 9], config),
        (first[:5] + [40, 41], config),
        ([first[0]] * 3, config),
    ]
    metrics = Metrics()
    got = run_all(model, jobs, max_running=1, metrics=metrics)  # one at a time: each finds those before
    for (prompt, _), (text, _) in zip(jobs, got, strict=True):
        assert text == Ids().decode(
            generate(model, torch.tensor([prompt]), None, config)[0, len(prompt) :].tolist()
        )
    # 9 of the second (the first whole), 5 of the third, 1 of the fourth
    assert metrics.prompt_tokens_cached._value.get() == 9 + 5 + 1


def test_a_prompt_tuned_model_decodes_in_the_batch_as_alone(tmp_path):
    """Its virtual tokens open every row of the running batch (rows of different lengths, padded on
    the left): each sequence gets the tokens graft generate gives it alone."""
    from graft.strategies import apply_strategy

    hf_model("llama", "causal-lm").save_pretrained(tmp_path)
    model = apply_strategy(load_model(tmp_path, task="causal-lm"), "prompt:4").eval()
    g = torch.Generator().manual_seed(5)
    config = GenerationConfig(max_new_tokens=7, eos_token_id=[])
    jobs = [(torch.randint(3, 99, (n,), generator=g).tolist(), config) for n in (5, 2, 9)]
    for (prompt, _), (text, _) in zip(jobs, run_all(model, jobs), strict=True):
        with torch.no_grad():
            alone = generate(model, torch.tensor([prompt]), None, config)[0, len(prompt) :].tolist()
        assert text == Ids().decode(alone)


def test_the_prefix_cache_keeps_the_longest_and_the_most_recent():
    kv = lambda n: ([torch.zeros(1, 1, n, 2)], [torch.zeros(1, 1, n, 2)])  # noqa: E731 16 bytes a position
    cache = PrefixCache(capacity=16 * 20)
    cache.add([1, 2, 3], *kv(3))
    assert cache.longest([1, 2, 3])[0] == 2  # never the last token: its logits are wanted
    assert cache.longest([1, 2, 3, 4])[0] == 3 and cache.longest([9, 2, 3])[0] == 0
    cache.add([1, 2, 3, 4, 5], *kv(5))  # extends the kept one: replaces it
    assert list(cache.entries) == [(1, 2, 3, 4, 5)] and cache.size == 16 * 5
    n, keys, values = cache.longest([1, 2, 3, 4, 6])
    assert n == 4 and keys[0].shape == values[0].shape == (1, 1, 4, 2)
    cache.add([7] * 8, *kv(8))
    cache.longest([1, 2, 3, 4, 5, 6])  # used: now the most recent
    cache.add([8] * 8, *kv(8))  # 5 + 8 + 8 > 20 positions: the least recently used goes
    assert list(cache.entries) == [(1, 2, 3, 4, 5), (8,) * 8]
    cache.add([9] * 21, *kv(21))  # larger than the whole cache: not kept
    assert (9,) * 21 not in cache.entries and cache.size == 16 * 13


def test_rows_have_their_own_stop_strings_eos_and_sampling(tmp_path):
    hf_model("llama", "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="causal-lm")
    prompt = [5, 17, 33, 8]
    greedy = GenerationConfig(max_new_tokens=10, eos_token_id=[])
    alone = generate(model, torch.tensor([prompt]), None, greedy)[0, 4:].tolist()
    stop = Ids().decode(alone[3:5])  # stops before the 4th token's text
    eos = GenerationConfig(max_new_tokens=10, eos_token_id=[alone[2]])
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, seed=7, eos_token_id=[])
    jobs = [(prompt, greedy), (prompt, greedy.replace(stop_strings=[stop])), (prompt, eos), (prompt, sampled)]
    got = run_all(model, jobs)
    assert got[0] == (Ids().decode(alone), ("done", "length", 4, 10))
    assert got[1] == (Ids().decode(alone[:3]), ("done", "stop", 4, 5))
    assert got[2] == (Ids().decode(alone[:2]), ("done", "stop", 4, 2))
    expected = generate(model, torch.tensor([prompt]), None, sampled)[0, 4:].tolist()
    assert got[3][0] == Ids().decode(expected)


def test_a_cancelled_sequence_leaves_at_the_next_step(tmp_path):
    hf_model("gpt2", "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="causal-lm")
    engine = ContinuousBatcher(model, Metrics())
    left = threading.Event()
    pieces = []

    def emit(event):
        pieces.append(event)
        if len(pieces) == 2:
            seq.cancelled = True

    seq = Sequence(
        [4, 5, 6], GenerationConfig(max_new_tokens=50, eos_token_id=[]), Ids(), emit, on_leave=left.set
    )
    engine.submit(seq)
    assert left.wait(timeout=600)
    engine.close()
    assert [p[0] for p in pieces] == ["text", "text"]  # not one more step, and no "done"


def test_held_back_text_could_start_a_stop_string():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("a<", ["<|end|>", "x"]) == 1


def test_token_budget_queue_batches_by_length_within_the_budget():
    calls = []
    gate = threading.Event()

    def run(op, items, options):
        gate.wait()
        calls.append(list(items))
        return [len(x) for x in items]

    queue = TokenBudgetQueue(run, Metrics(), max_batch_tokens=40, max_wait_ms=0)
    first = queue.submit("hold", ["blocker"], [1], {})  # the worker holds this one until the gate opens
    futures = [
        queue.submit("embed", [t], [n], {}) for t, n in (("a", 10), ("bb", 2), ("ccc", 9), ("dddd", 3))
    ]
    other = queue.submit("predict", ["e"], [2], {})
    gate.set()
    assert first.result() == [7]
    assert [f.result() for f in futures] == [[1], [2], [3], [4]]
    assert other.result() == [1]
    queue.close()
    # after the blocker: the oldest (10 tokens) with its nearest lengths while 4 x 10 <= 40; predict apart
    assert calls[1] == ["a", "ccc", "dddd", "bb"] and calls[2] == ["e"]


def words(op, jobs):
    """A ``prepare`` whose tokens are a text's words: a text with "!" in it is refused."""
    made = []
    for items in jobs:
        if any("!" in text for text in items):
            made.append(ValueError(f"refused: {items}"))
        else:
            made.append(([text.split() for text in items], [len(text.split()) for text in items]))
    return made


def test_raw_requests_are_prepared_on_the_worker_then_batched_by_their_real_lengths():
    """Raw jobs (texts not tokenized yet, their lengths a guess) are prepared in one call for all
    of them on the worker before the batch is picked, by the real lengths. A job prepare refuses
    gets the error, the others run; each raw future answers its results and its real lengths."""
    prepared, calls = [], []
    gate = threading.Event()

    def prepare(op, jobs):
        prepared.append((op, [list(items) for items in jobs]))
        return words(op, jobs)

    def run(op, items, options):
        gate.wait(30)
        calls.append(list(items))
        return [len(words) for words in items]

    queue = TokenBudgetQueue(run, Metrics(), max_batch_tokens=10, max_wait_ms=0, prepare=prepare)
    first = queue.submit("hold", ["blocker"], [1], {})  # the worker holds this one until the gate opens
    texts = ("x", "a b c d e", "y!", "p q r s t")
    futures = [queue.submit("embed", [t], [1], {}, raw=True) for t in texts]  # every guess: 1 token
    gate.set()
    assert first.result(timeout=30) == [7]
    assert futures[0].result(timeout=30) == ([1], [1])
    assert futures[1].result(timeout=30) == ([5], [5])
    with pytest.raises(ValueError, match="refused"):
        futures[2].result(timeout=30)
    assert futures[3].result(timeout=30) == ([5], [5])
    queue.close()
    assert prepared == [("embed", [["x"], ["a b c d e"], ["y!"], ["p q r s t"]])]
    # by their real lengths: "x" and the nearest fit the budget (2 rows x 5 <= 10), the third 5-word
    # text does not (3 x 5); by the guesses (1 token each) all three would have run at once
    assert calls[1:] == [[["a", "b", "c", "d", "e"], ["x"]], [["p", "q", "r", "s", "t"]]]


def test_raw_requests_arriving_while_the_worker_prepares_wait_for_the_next_round():
    """The lock is let go while ``prepare`` runs (requests keep arriving); one that arrives then is
    not run raw in the batch being picked but prepared for the next."""
    calls = []
    inside, go_on = threading.Event(), threading.Event()

    def prepare(op, jobs):
        if not inside.is_set():
            inside.set()
            go_on.wait(30)
        return words(op, jobs)

    queue = TokenBudgetQueue(
        lambda op, items, options: calls.append(list(items)) or items,
        Metrics(),
        max_wait_ms=0,
        prepare=prepare,
    )
    first = queue.submit("embed", ["a b"], [1], {}, raw=True)
    assert inside.wait(30)
    late = queue.submit("embed", ["c"], [1], {}, raw=True)  # while the first is being prepared
    go_on.set()
    assert first.result(timeout=30) == ([["a", "b"]], [2]) and late.result(timeout=30) == ([["c"]], [1])
    queue.close()
    assert calls == [[["a", "b"]], [["c"]]]


def test_a_raw_request_needs_a_queue_that_prepares():
    queue = TokenBudgetQueue(lambda op, items, options: items, Metrics())
    with pytest.raises(ValueError, match="raw jobs need a queue with a prepare function"):
        queue.submit("embed", ["a"], [1], {}, raw=True)
    queue.close()


def test_token_budget_queue_with_two_workers_runs_two_batches_at_once():
    """Both workers inside ``run`` at the same moment (the barrier needs two), each answering its own."""
    both_in = threading.Barrier(2, timeout=30)

    def run(op, items, options):
        both_in.wait()  # raises BrokenBarrierError (the job's error) if the second batch never comes
        return [f"{op}:{x}" for x in items]

    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=0, workers=2)
    with queue.cond:  # both queued before a worker looks (one alone would run on every thread)
        embed, predict = queue.submit("embed", ["a"], [1], {}), queue.submit("predict", ["b"], [1], {})
    assert embed.result(timeout=60) == ["embed:a"] and predict.result(timeout=60) == ["predict:b"]
    queue.close()
    assert not any(worker.is_alive() for worker in queue.workers)


@pytest.fixture
def torch_threads():
    """torch's thread count as it was: a worker's set_num_threads is its own thread's (OpenMP's),
    but also what threads started later begin with."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_with_two_workers_a_lone_batch_runs_on_every_thread_and_two_at_once_on_half_each(torch_threads):
    seen = []  # (worker thread, item, torch threads in that thread)
    both_in = threading.Barrier(2, timeout=30)

    def run(op, items, options):
        seen.append((threading.current_thread().name, items[0], torch.get_num_threads()))
        if op == "pair":
            both_in.wait()  # both of the pair inside run at once
        return items

    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=0, workers=2, threads=2)
    try:
        assert queue.submit("lone", ["a"], [3], {}).result(timeout=60) == ["a"]
        with queue.cond:  # both queued before a worker looks: each free worker takes its share
            pair = [queue.submit("pair", [x], [3], {}) for x in "bc"]
        assert [f.result(timeout=60) for f in pair] == [["b"], ["c"]]
    finally:
        queue.close()
    assert seen[0] == ("graft-encoder-queue-0", "a", 2)  # only worker 0 ever runs on every thread
    assert sorted(seen[1:]) == [("graft-encoder-queue-0", "b", 1), ("graft-encoder-queue-1", "c", 1)]


def test_while_a_batch_runs_on_every_thread_no_other_starts(torch_threads):
    started, gate = [], threading.Event()

    def run(op, items, options):
        started.append(items[0])
        if items[0] == "a":
            gate.wait(30)
        return items

    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=0, workers=2, threads=2)
    try:
        first = queue.submit("embed", ["a"], [3], {})
        while not started:
            time.sleep(0.01)
        second = queue.submit("embed", ["b"], [3], {})  # worker 1 is free, but "a" has both threads
        time.sleep(0.3)
        assert started == ["a"]
        gate.set()
        assert first.result(timeout=60) == ["a"] and second.result(timeout=60) == ["b"]
    finally:
        gate.set()
        queue.close()


def test_divide_splits_a_batch_into_parts_of_about_equal_tokens():
    def tokens(parts):
        return [sum(j.tokens for j in part) for part in parts]

    five = [Job("embed", [i], [10], {}) for i in range(5)]
    assert tokens(divide(five, 2)) == [30, 20]
    long_first = [Job("embed", [0], [30], {}), *(Job("embed", [i], [10], {}) for i in range(3))]
    assert tokens(divide(long_first, 2)) == [30, 30]  # the long one alone, the three short together
    assert tokens(divide(five[:1], 2)) == [10]  # never an empty part
    for n in (1, 2, 3, 7):
        parts = divide(five + long_first, n)
        assert sorted(id(j) for part in parts for j in part) == sorted(id(j) for j in five + long_first)
        assert len(parts) == min(n, 9) and all(parts)


def test_with_two_workers_a_round_splits_the_batch_and_answers_and_goes_on_when_both_parts_end(torch_threads):
    seen, gate = [], threading.Event()

    def run(op, items, options):
        seen.append((threading.current_thread().name, list(items)))
        if threading.current_thread().name.endswith("-1"):
            gate.wait(30)  # worker 1's part of the round lasts until the test opens the gate
        return items

    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=0, workers=2, threads=2)
    try:
        with queue.cond:  # all queued before worker 0 looks
            first = [queue.submit("embed", [i], [n], {}) for i, n in enumerate((40, 30, 20, 10, 10))]
        while len(seen) < 2 or queue.free < 1:  # both parts started, and worker 0's has ended...
            time.sleep(0.01)
        later = queue.submit("embed", [5], [10], {})
        time.sleep(0.3)
        # ...but the round has not: worker 0's answers wait for it, and nothing else starts
        assert not any(f.done() for f in [*first, later]) and len(seen) == 2
        gate.set()
        assert [f.result(timeout=60) for f in first] == [[i] for i in range(5)]
        assert later.result(timeout=60) == [5]
    finally:
        gate.set()
        queue.close()
    # parts of 60 and 50 tokens: the longest first, each into the part with fewer tokens
    assert sorted(seen[:2]) == [("graft-encoder-queue-0", [0, 3, 4]), ("graft-encoder-queue-1", [1, 2])]
    assert seen[2] == ("graft-encoder-queue-0", [5])  # a lone request, after the round


def test_closing_while_a_round_runs_answers_every_queued_request(torch_threads):
    gate = threading.Event()

    def run(op, items, options):
        gate.wait(30)
        return items

    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=0, workers=2, threads=2)
    with queue.cond:
        first = [queue.submit("embed", [i], [10], {}) for i in range(4)]
    while queue.free == 2:  # the round has started
        time.sleep(0.01)
    rest = [queue.submit("embed", [i], [10], {}) for i in range(4, 9)]
    closing = threading.Thread(target=queue.close)
    closing.start()
    gate.set()
    closing.join(60)
    assert not closing.is_alive() and not any(worker.is_alive() for worker in queue.workers)
    assert [f.result(timeout=0) for f in first + rest] == [[i] for i in range(9)]


def test_an_arrival_wakes_a_worker_only_when_one_is_idle_or_the_held_batch_is_complete():
    """A worker holding a batch back for company wakes by itself when its wait ends: an arrival
    wakes it only when the batch now has every request expected or fills the token budget."""
    queue = TokenBudgetQueue(lambda op, items, options: items, Metrics(), max_batch_tokens=100)
    try:
        with queue.cond:  # the worker waits for a notify that does not come while the test looks
            assert queue.wakes()  # free and idle: any arrival wakes it
            queue.holding, queue.owed = True, 1
            for i in range(2):
                queue.add(Job("embed", [i], [10], {}))
            assert not queue.wakes()  # one client not back yet: the worker's own timer will do
            queue.add(Job("embed", [2], [10], {}))
            queue.owed = 0
            assert queue.wakes()  # the last one back completes it
            queue.owed = 7
            assert not queue.wakes()  # 3 of 10, 3 x 10 tokens: neither
            queue.add(Job("embed", [3], [40], {}))
            assert queue.wakes()  # 4 rows x 40 tokens > 100: the budget is full
            queue.jobs, queue.rows, queue.widest, queue.holding, queue.owed = [], 0, 0, False, 0
    finally:
        queue.close()


def test_with_two_workers_an_arrival_wakes_worker_0_only_between_rounds(torch_threads):
    """Worker 0 starts every round: an arrival wakes it when it is idle or its held batch is now
    complete, and never while a round runs (the round's end does)."""
    queue = TokenBudgetQueue(lambda op, items, options: items, Metrics(), max_batch_tokens=100, workers=2)
    try:
        with queue.cond:
            assert queue.wakes()  # both free, worker 0 idle
            queue.holding, queue.owed = True, 1  # worker 0 holds a batch for one more client
            for i in range(2):
                queue.add(Job("embed", [i], [10], {}))
            assert not queue.wakes()
            queue.add(Job("embed", [2], [10], {}))
            queue.owed = 0
            assert queue.wakes()  # the last one back completes the batch
            queue.holding, queue.free = False, 1  # a round runs (one part has ended, the other not)
            assert not queue.wakes()
            queue.jobs, queue.free = [], 2
    finally:
        queue.close()


@pytest.mark.parametrize("full", [False, True])
def test_the_next_batch_waits_until_the_event_loop_has_written_the_last_ones_answers(full):
    """The answered clients cannot come back before their answers are out: a request queued
    meanwhile waits for them (it used to start as soon as the forward ended, and the clients of
    every round came back to find the next one started without them); a full batch does not."""
    calls, gate = [], threading.Event()

    def run(op, items, options):
        calls.append(list(items))
        gate.wait(30)
        return items

    queue = TokenBudgetQueue(run, Metrics(), max_batch_tokens=6, max_wait_ms=5000)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = [queue.submit("embed", [x], [3], {}, loop) for x in "ab"]
        while not calls:  # the forward of a and b has started
            await asyncio.sleep(0.01)
        straggler = queue.submit("embed", ["c"], [6 if full else 3], {})  # a thread's future
        gate.set()
        time.sleep(0.5)  # the loop is busy: the forward ends, but its answers cannot be written
        assert calls == ([["a", "b"], ["c"]] if full else [["a", "b"]])
        assert await asyncio.gather(*first) == [["a"], ["b"]]
        assert await asyncio.wrap_future(straggler) == ["c"]  # (once they are out)
        assert calls == [["a", "b"], ["c"]]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        gate.set()
        queue.close()


def test_clients_of_every_batch_that_ended_are_owed_until_they_come_back(torch_threads):
    """Two batches end one after the other: the server waits for the clients of both, not only for
    the last batch's (which could leave the first's clients out of the next batch); each arrival
    pays one back."""
    queue = TokenBudgetQueue(lambda op, items, options: items, Metrics(), workers=2)
    try:
        first = [Job("embed", [i], [10], {}) for i in range(16)]
        second = [Job("embed", [i], [10], {}) for i in range(16, 32)]
        with queue.cond:
            queue.free = 0  # both workers run a batch
        queue.forward(first)
        assert queue.owed == 16
        for i in range(5):  # five of the first batch's clients come back
            queue.submit("embed", [i], [10], {})
        assert queue.owed == 11
        queue.forward(second)
        assert queue.owed == 27
        queue.costs["embed"] = Fixed(0.05)
        with queue.cond:
            assert queue.worth_waiting() > 0  # 5 queued of the 32 the server knows of
            queue.owed = 0
            assert queue.worth_waiting() == 0  # every one back: start
    finally:
        queue.close()


def test_a_request_held_for_company_runs_once_and_both_workers_go_on():
    """A lone request held for company runs once, and both workers go on serving (when both
    workers held batches, the one whose wait ended second used to fail on the empty queue)."""
    calls = []
    queue = TokenBudgetQueue(lambda op, items, options: calls.append(items) or items, Metrics(), workers=2)
    queue.costs["embed"] = Fixed(0.05)  # hold a request 50 ms for company...
    queue.owed = 10  # ...as 10 clients are expected back
    assert queue.submit("embed", ["a"], [3], {}).result(timeout=60) == ["a"]
    time.sleep(0.2)  # both workers' waits have ended by now
    assert all(worker.is_alive() for worker in queue.workers)
    assert queue.submit("embed", ["b"], [3], {}).result(timeout=60) == ["b"]
    queue.close()
    assert calls == [["a"], ["b"]]


def cost(groups, lengths, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_split_is_the_cheapest_grouping(seed):
    """Against every split of the length-sorted rows into runs (the best grouping is one of those)."""
    import itertools
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
    overhead = rng.choice([0, 4, 32, 500])
    groups = split(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)  # each group keeps the requests' order
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        cost([order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)])], lengths, overhead)
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(groups, lengths, overhead) == best


class Held:
    """A runner that records each forward, and holds the worker inside the one of a "hold" job until
    ``gate`` opens (so that the jobs submitted meanwhile are all queued when it picks the next batch)."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.holding, self.gate = threading.Event(), threading.Event()

    def __call__(self, op, items, options):
        if op == "hold":
            self.holding.set()
            self.gate.wait()
        else:
            self.calls.append(list(items))
        return [f"<{x}>" for x in items]

    def hold(self, queue: TokenBudgetQueue) -> None:
        self.holding.clear()
        self.gate.clear()
        queue.submit("hold", ["blocker"], [1], {})
        assert self.holding.wait(timeout=600)


def test_a_batch_of_mixed_lengths_runs_as_forwards_of_similar_lengths():
    run = Held()
    queue = TokenBudgetQueue(run, Metrics(), max_batch_tokens=1000, max_wait_ms=200, overhead_tokens=4)
    run.hold(queue)
    jobs = [(["long", "s1"], [50, 2]), (["s2"], [3]), (["s3", "l2"], [2, 48])]
    futures = [queue.submit("embed", items, lengths, {}) for items, lengths in jobs]
    run.gate.set()
    results = [f.result(timeout=600) for f in futures]
    queue.close()
    assert results == [["<long>", "<s1>"], ["<s2>"], ["<s3>", "<l2>"]]  # back to each request, in order
    forwards = sorted(sorted(call) for call in run.calls)
    assert forwards == [["l2", "long"], ["s1", "s2", "s3"]]  # 2 forwards: 2 x 50 + 3 x 3 tokens


class Fixed:
    """A forward's fixed cost as the test sets it (the queue measures its own: ForwardCost)."""

    def __init__(self, seconds: float) -> None:
        self.fixed = seconds

    def record(self, tokens: int, seconds: float) -> None:
        pass


def test_a_batch_waits_for_company_only_while_more_requests_are_known_and_coming():
    """A lone request runs at once; after a batch of 3, the next waits for 3 while they keep
    coming, up to a forward's fixed cost after the last arrival and max_wait after the forward."""
    run = Held()
    run.gate.set()
    queue = TokenBudgetQueue(run, Metrics(), max_wait_ms=3_600_000)  # an hour
    queue.costs["embed"] = Fixed(3600)
    assert queue.submit("embed", ["alone"], [3], {}).result(timeout=600) == ["<alone>"]
    run.hold(queue)
    three = [queue.submit("embed", [t], [3], {}) for t in ("a", "b", "c")]
    queue.max_wait = 0.01
    run.gate.set()  # 4 requests known (the held one and these): 3 wait up to max_wait for a 4th, then run
    assert [f.result(timeout=600) for f in three] == [["<a>"], ["<b>"], ["<c>"]]
    queue.max_wait = 3600  # only company ends the wait now
    futures = [queue.submit("embed", ["d"], [3], {})]  # the last batch held 3: "d" waits for 2 more
    futures += [queue.submit("embed", [t], [3], {}) for t in ("e", "f")]
    assert [f.result(timeout=600) for f in futures] == [["<d>"], ["<e>"], ["<f>"]]
    queue.costs["embed"] = Fixed(0.01)  # or arrivals that stop for longer than a forward's fixed cost
    assert queue.submit("embed", ["g"], [3], {}).result(timeout=600) == ["<g>"]
    queue.close()
    assert run.calls == [["alone"], ["a", "b", "c"], ["d", "e", "f"], ["g"]]


# start_at(arrived, expected, full, free_since, fixed, max_wait): times in seconds; a forward ended at
# t=10.0 and has a fixed cost of 3 ms; max_wait is 20 ms
FREE, FIXED, MAX_WAIT = 10.0, 0.003, 0.020


def when(arrived: list[float], expected: int, full: bool = False, fixed: float = FIXED) -> float:
    return start_at(arrived, expected, full, FREE, fixed, MAX_WAIT)


def test_a_lone_client_or_every_request_expected_starts_at_once():
    assert when([10.001], expected=1) == NOW  # one client: its next request never waits
    assert when([10.001, 10.002, 10.002], expected=3) == NOW  # everyone the server knows of is here
    assert when([9.0, 10.0005], expected=2) == NOW  # company that had already arrived


def test_a_full_batch_or_an_unknown_cost_starts_at_once():
    assert when([10.001], expected=32, full=True) == NOW
    assert when([10.001], expected=32, fixed=0.0) == NOW  # no forwards measured yet: no guessing


def test_a_short_batch_waits_one_fixed_cost_after_the_last_arrival():
    """32 clients known, 5 back: the 6th is worth waiting for if it comes within 3 ms of the 5th."""
    arrived = [10.0002, 10.0005, 10.0009, 10.0010, 10.0014]
    assert when(arrived, expected=32) == pytest.approx(10.0014 + FIXED)
    assert when([10.0005, 10.0002], expected=32) == pytest.approx(10.0005 + FIXED)  # in any order


def test_a_short_batch_waits_one_fixed_cost_after_the_forward_for_the_clients_it_answered():
    """Those queued during the forward arrived long ago; the answered ones come back only after it."""
    assert when([9.0, 9.5], expected=32) == pytest.approx(FREE + FIXED)


def test_a_short_batch_waits_at_most_max_wait_after_the_forward():
    arrived = [FREE + 0.0185, FREE + 0.019]  # still arriving, but the last forward ended 19 ms ago
    assert when(arrived, expected=32) == pytest.approx(FREE + MAX_WAIT)


@pytest.mark.parametrize("fixed", [0.0005, 0.003, 0.04])
def test_forward_cost_finds_the_fixed_part_of_a_forward(fixed):
    cost = ForwardCost()
    for i in range(7):
        cost.record(16 * (i + 1), fixed + 1e-5 * 16 * (i + 1))
    assert cost.fixed == 0.0  # fewer than 8 forwards: unknown
    cost.record(200, fixed + 1e-5 * 200)
    assert cost.fixed == pytest.approx(fixed)
    same = ForwardCost()
    for _ in range(10):
        same.record(32, 0.01)  # one size only: the fixed part cannot be told from the rest
    assert same.fixed == 0.0


def test_forward_cost_stays_within_what_a_forward_took():
    """A noisy fit (a busy machine) answers between 0 and the quickest forward."""
    falling = ForwardCost()
    for i in range(8):
        falling.record(10 * (i + 1), 0.05 - 0.001 * i)  # bigger forwards took less time
    assert falling.fixed == pytest.approx(0.043)  # not the intercept 0.051: the quickest forward
    rising = ForwardCost()
    for i in range(8):
        rising.record(10 * (i + 1), 0.001 * (i + 1) ** 2)
    assert rising.fixed == 0.0


def test_metrics_read_the_queued_and_admitted_requests_when_scraped():
    """graft_queue_size and graft_in_flight are read at each scrape (not set at every request), and
    each answered request counts once under its endpoint and status, with its latency."""
    from graft.serve.app import Settings, State

    def sample(metrics: Metrics, name: str) -> float:
        line = next(x for x in metrics.text().decode().splitlines() if x.startswith(name + " "))
        return float(line.rsplit(" ", 1)[1])

    state = State(Settings())
    queue = TokenBudgetQueue(lambda op, items, options: items, state.metrics)
    try:
        with queue.cond:  # the worker cannot take them while the test looks
            for i in range(3):
                queue.add(Job("embed", [i], [5], {}))
            assert sample(state.metrics, "graft_queue_size") == 3
            queue.jobs, queue.rows, queue.widest = [], 0, 0
        state.admit(2)
        assert sample(state.metrics, "graft_in_flight") == 2
        state.release(2)
        assert sample(state.metrics, "graft_in_flight") == 0
    finally:
        queue.close()
    for seconds in (0.01, 0.2):
        state.metrics.request("/v1/embeddings", "200", seconds)
    state.metrics.request("/v1/embeddings", "422", 0.001)
    text = state.metrics.text().decode()
    assert 'graft_requests_total{endpoint="/v1/embeddings",status="200"} 2.0' in text
    assert 'graft_requests_total{endpoint="/v1/embeddings",status="422"} 1.0' in text
    assert 'graft_request_seconds_count{endpoint="/v1/embeddings"} 3.0' in text
