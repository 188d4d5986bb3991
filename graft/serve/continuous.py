"""Continuous batching of causal-LM requests (vLLM's scheduling, on graft's plain KV cache).

One thread runs the model. At every decoding step, waiting requests join the running batch
(their prompt runs alone, then its keys and values move into the batch's cache) and finished
or abandoned ones leave it; each row keeps its own positions, sampling settings, random
generator and stop strings. The rows' caches are aligned on the right: a row that joins with
a shorter history is padded on the left (masked out), and columns no row needs any more are
dropped when rows leave. A prompt that begins as a recent one did (a chat's next turn resends
the conversation; requests share a system prompt) runs only from where the two part, on the
kept keys and values of the beginning (``PrefixCache``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graft import kernels
from graft.generation import GenerationConfig, process
from graft.generation.decoder import sampler, seen_tokens
from graft.nn import KVCache
from graft.serve.metrics import Metrics

log = logging.getLogger("graft")

HEADROOM = 64  # cache columns allocated ahead, so most steps write in place


# a token's log-probability: (its id, its log-probability, or None for a prompt's first token, and
# the likeliest tokens at its place as (id, log-probability), likeliest first)
Scored = tuple[int, float | None, list[tuple[int, float]]]


def scored(logits: torch.Tensor, tokens: list[int], top: int) -> list[Scored]:
    """Each of ``tokens``' log-probability under the (T, V) ``logits`` of its place (the raw model's
    distribution, before any sampling setting, as vLLM's default), with the ``top`` likeliest
    tokens there; computed 256 places at a time in float32."""
    out: list[Scored] = []
    for start in range(0, len(tokens), 256):
        chunk = logits[start : start + 256].float().log_softmax(-1)  # (t, V)
        ids = torch.tensor(tokens[start : start + 256])
        chosen = chunk.gather(-1, ids[:, None])[:, 0].tolist()
        best = chunk.topk(top, -1) if top else None
        for i, token in enumerate(ids.tolist()):
            alternatives = (
                list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best else []
            )
            out.append((token, chosen[i], alternatives))
    return out


@dataclass
class Sequence:
    """One request being generated. ``emit`` is called from the model's thread with
    ("text", piece), then ("done", finish_reason, prompt_tokens, completion_tokens) or ("error", message);
    with ``logprobs`` set, ("logprobs", [Scored, ...]) comes before the text its tokens make: the
    prompt's first (with ``echo``), then each generated token's, the end-of-text token included."""

    prompt: list[int]
    config: GenerationConfig
    tokenizer: Any
    emit: Callable[[tuple], None]
    cancelled: bool = False  # set by the request's side (a client gone): the row leaves at the next step
    generated: list[int] = field(default_factory=list)
    shown: str = ""
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) bool, for the repetition penalty
    on_leave: Callable[[], None] | None = None  # called once, when the row leaves the batch (or never joins)
    left: bool = False
    logprobs: int | None = None  # how many likeliest tokens to list beside each token's (None: no logprobs)
    echo: bool = False  # the prompt's tokens' log-probabilities too (scoring a text)
    generate: bool = True  # False: the prompt is only scored (echo), nothing generated (max_tokens 0)
    constraint: Any = None  # graft.generation.constrain.Constraint (one row): the tokens it may take
    special: bool = False  # the text keeps special tokens (a tool-call format's markers)
    arrived: float = field(default_factory=time.monotonic)

    def score(self, logits: torch.Tensor) -> None:
        """Send the log-probability of each prompt token after the first, given (T, V) ``logits``."""
        first: Scored = (self.prompt[0], None, [])
        self.emit(("logprobs", [first, *scored(logits[:-1], self.prompt[1:], self.logprobs or 0)]))

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's (V,) float32 logits, with this row's settings."""
        step = len(self.generated)
        penalized = step and (self.config.presence_penalty or self.config.frequency_penalty)
        new = torch.tensor([self.generated]) if penalized else None  # (1, step): what the penalties count
        allowed = self.constraint.allowed() if self.constraint is not None else None  # (1, V)
        scores = process(logits[None], self.seen, self.config, new, step, allowed)  # (1, V)
        if self.config.do_sample:
            return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        return int(scores.argmax(-1))

    def accept(self, token: int) -> str | None:
        """Take ``token``, send the text it completes; the finish reason when the row is done."""
        if token in self.config.eos_ids:
            return self.finish("stop")
        if self.constraint is not None:
            self.constraint.advance([token], [0])
        self.generated.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        text = self.tokenizer.decode(self.generated, skip_special_tokens=not self.special)
        stops = self.config.stop_strings or []
        cut = first_stop(text, stops, since=len(self.shown))
        if cut is not None:  # the reply ends before the stop string (as OpenAI's servers do)
            self.send(text[:cut])
            return self.finish("stop")
        if len(self.generated) >= self.config.max_new_tokens:
            self.send(text)
            return self.finish("length")
        if not text.endswith("\ufffd"):  # an incomplete character waits for its next bytes
            self.send(text[: len(text) - held_back(text, stops)])
        return None

    def send(self, text: str) -> None:
        if len(text) > len(self.shown):
            self.emit(("text", text[len(self.shown) :]))
            self.shown = text

    def finish(self, reason: str) -> str:
        self.emit(("done", reason, len(self.prompt), len(self.generated)))
        self.leave()
        return reason

    def leave(self) -> None:
        if not self.left:
            self.left = True
            if self.on_leave is not None:
                self.on_leave()


def first_stop(text: str, stops: list[str], since: int = 0) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (None: none does), looking only at what could
    be new since the first ``since`` characters were checked."""
    hits = [at for at in (text.find(s, max(0, since - len(s))) for s in stops) if at >= 0]
    return min(hits, default=None)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class PrefixCache:
    """The keys and values of recent prompts, kept so that a prompt beginning as one of them did is
    computed only from where the two part: vLLM's automatic prefix caching, over whole prompts
    rather than blocks of tokens. A prompt that extends a kept one replaces it (a conversation's
    turns keep one entry); beyond ``capacity`` bytes the least recently used go first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # prompt tokens -> (its tokens as an array, (1, nkv, T, hd) keys and values per layer, bytes)
        self.entries: OrderedDict[
            tuple[int, ...], tuple[np.ndarray, list[torch.Tensor], list[torch.Tensor], int]
        ]
        self.entries = OrderedDict()
        self.size = 0  # bytes kept

    def longest(self, prompt: list[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """The most leading positions of ``prompt`` a kept prompt shares (never its last token,
        whose logits are wanted), and their (1, nkv, n, hd) keys and values per layer."""
        tokens = np.asarray(prompt)
        best, found = 0, None
        for key, (kept, _, _, _) in self.entries.items():
            m = min(len(kept), len(tokens) - 1)
            same = kept[:m] == tokens[:m]
            n = m if same.all() else int(same.argmin())
            if n > best:
                best, found = n, key
        if found is None:
            return 0, [], []
        self.entries.move_to_end(found)
        _, keys, values, _ = self.entries[found]
        return best, [k[:, :, :best] for k in keys], [v[:, :, :best] for v in values]

    def add(self, prompt: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep ``prompt``'s (1, nkv, T, hd) keys and values per layer."""
        size = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if size > self.capacity:
            return
        tokens = np.asarray(prompt)
        for key, (kept, _, _, kept_size) in list(self.entries.items()):  # kept prompts this one extends
            if len(kept) <= len(tokens) and (kept == tokens[: len(kept)]).all():
                del self.entries[key]
                self.size -= kept_size
        self.entries[tuple(prompt)] = (tokens, keys, values, size)
        self.size += size
        while self.size > self.capacity:
            _, (_, _, _, dropped) = self.entries.popitem(last=False)
            self.size -= dropped


class RunningBatch:
    """The cache, mask and next positions of the rows being decoded together."""

    def __init__(self, model: torch.nn.Module, prefixes: PrefixCache | None = None) -> None:
        self.model = model
        self.prefixes = prefixes
        self.layers = model.config.num_blocks
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L): 1 = a real position of that row
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,): each row's next position
        k = kernels.kernels_of(model)
        self.store = k.store(model) if k is not None else None
        self.cached = 0  # the last prompt's leading positions taken from the prefix cache
        self.virtual = getattr(getattr(model, "body", None), "virtual_tokens", 0)  # prompt tuning's

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    def rebuild(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """A fresh cache holding (B, nkv, L, hd) ``keys``/``values`` per layer, with room to grow."""
        length = keys[0].shape[2]
        cache = KVCache(self.layers, capacity=length + HEADROOM)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.keys[i] = F.pad(k, (0, 0, 0, HEADROOM))  # (B, nkv, L + HEADROOM, hd)
            cache.values[i] = F.pad(v, (0, 0, 0, HEADROOM))
        cache.lengths = [length] * self.layers
        self.cache = cache

    def run(self, prompt: list[int], every: bool = False) -> tuple[torch.Tensor, list, list]:
        """Run one prompt alone (from a kept beginning, unless ``every``): its next-token logits,
        (V,) float32 (with ``every``: the logits after each prompt token, (T, V) in the model's
        dtype), and its (1, nkv, S, hd) keys and values per layer (S: its prompt's positions,
        after a prompt-tuned model's virtual tokens)."""
        device = self.mask.device
        T = len(prompt)
        # a kept beginning (not when every position's logits are wanted): its keys and values
        n, past_k, past_v = (0, [], []) if every or self.prefixes is None else self.prefixes.longest(prompt)
        self.cached = n
        cache = KVCache(self.layers, capacity=T)
        for i in range(self.layers if n else 0):
            cache.update(i, past_k[i], past_v[i])
        ids = torch.tensor([prompt[n:]], dtype=torch.long, device=device)  # (1, T - n)
        with kernels.frozen(self.model, self.store):
            out = self.model(
                input_ids=ids,
                position_ids=torch.arange(n, T, device=device)[None],
                cache=cache,
                logits_to_keep=0 if every else 1,
            )
        logits = out.logits[0] if every else out.logits[0, -1].float()
        S = cache.length
        keys = [cache.keys[i][:, :, :S] for i in range(self.layers)]  # (1, nkv, S, hd)
        values = [cache.values[i][:, :, :S] for i in range(self.layers)]
        return logits, keys, values

    def prefill(self, prompt: list[int], every: bool = False) -> torch.Tensor:
        """Run one prompt alone and add its row to the batch; its logits, as ``run`` gives them."""
        device = self.mask.device
        T = len(prompt)
        logits, new_k, new_v = self.run(prompt, every)
        # the row's positions: its prompt's, after a prompt-tuned model's virtual tokens
        S = new_k[0].shape[2]
        if self.prefixes is not None:
            self.prefixes.add(prompt, new_k, new_v)
        if self.cache is None or self.size == 0:
            self.rebuild(new_k, new_v)
            self.mask = torch.ones(1, S, dtype=torch.long, device=device)
            self.positions = torch.tensor([T], device=device)  # (the model counts virtual tokens itself)
            return logits
        L = self.cache.length
        width = max(L, S)
        keys, values = [], []
        for i in range(self.layers):  # pad on the left to the same width, then one batch
            old_k, old_v = self.cache.keys[i][:, :, :L], self.cache.values[i][:, :, :L]
            keys.append(
                torch.cat([F.pad(old_k, (0, 0, width - L, 0)), F.pad(new_k[i], (0, 0, width - S, 0))])
            )
            values.append(
                torch.cat([F.pad(old_v, (0, 0, width - L, 0)), F.pad(new_v[i], (0, 0, width - S, 0))])
            )
        self.rebuild(keys, values)
        row = F.pad(torch.ones(1, S, dtype=torch.long, device=device), (width - S, 0))
        self.mask = torch.cat([F.pad(self.mask, (width - L, 0)), row])  # (B + 1, width)
        self.positions = torch.cat([self.positions, torch.tensor([T], device=device)])
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep ``rows`` only, and drop the leading columns none of them needs any more."""
        if not rows:
            self.cache, self.mask, self.positions = None, self.mask[:0, :0], self.positions[:0]
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())  # the first column some row still reads
        L = self.cache.length
        keys = [self.cache.keys[i].index_select(0, index)[:, :, first:L] for i in range(self.layers)]
        values = [self.cache.values[i].index_select(0, index)[:, :, first:L] for i in range(self.layers)]
        self.rebuild(keys, values)
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; the next-token logits, (B, V) float32."""
        device = self.mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1)
        mask = self.mask if not bool(self.mask.all()) else None
        if mask is not None and self.virtual:  # (B, 1, 1, L + 1), used as given: the columns hold
            mask = mask[:, None, None, :].bool()  # the virtual tokens already (a 2-D mask would add them)
        with kernels.frozen(self.model, self.store):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=self.positions[:, None],
                cache=self.cache,
                logits_to_keep=1,
            )
        self.positions = self.positions + 1
        return out.logits[:, -1].float()  # (B, V)


class ContinuousBatcher:
    """The model's thread: admits waiting sequences, decodes the running batch one step at a time."""

    def __init__(
        self, model: torch.nn.Module, metrics: Metrics, max_running: int = 64, prefix_cache_bytes: int = 0
    ) -> None:
        self.model, self.metrics, self.max_running = model, metrics, max_running
        # (not for a prompt-tuned model: its learned positions open every sequence, not a prompt's tokens)
        virtual = getattr(getattr(model, "body", None), "virtual_tokens", 0)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and not virtual else None
        self.waiting: list[Sequence] = []
        self.closed = False
        self.cond = threading.Condition()
        self.worker = threading.Thread(target=self.serve, name="graft-decoder", daemon=True)
        self.worker.start()

    def submit(self, seq: Sequence) -> None:
        if seq.config.do_sample:
            seq.generator = sampler(seq.config, torch.device("cpu"))
        if seq.config.repetition_penalty != 1.0:
            seq.seen = seen_tokens(torch.tensor([seq.prompt]), None, self.model.config.vocab_size)
        with self.cond:
            self.waiting.append(seq)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.worker.join()

    def serve(self) -> None:
        batch = RunningBatch(self.model, self.prefixes)
        rows: list[Sequence] = []
        logits = torch.zeros(0)
        while True:
            with self.cond:
                while not self.waiting and not rows and not self.closed:
                    self.cond.wait()
                if self.closed and not rows and not self.waiting:
                    return
                joining = self.waiting[: max(0, self.max_running - len(rows))]
                del self.waiting[: len(joining)]
                self.metrics.queue.set(len(self.waiting))
            try:
                with torch.inference_mode():
                    rows, logits = self.advance(batch, rows, logits, joining)
            except Exception as e:  # a failure ends the batch's requests, never the server
                log.exception("graft serve: decoding failed")
                for seq in rows + joining:
                    seq.emit(("error", f"generation failed: {e}"))
                    seq.leave()
                batch, rows, logits = RunningBatch(self.model, self.prefixes), [], torch.zeros(0)
            self.metrics.running.set(len(rows))

    def advance(
        self, batch: RunningBatch, rows: list[Sequence], logits: torch.Tensor, joining: list[Sequence]
    ) -> tuple[list[Sequence], torch.Tensor]:
        """One step: prefill the joining rows, pick every row's token, drop the finished, decode."""
        rows_logits = list(logits)  # one (V,) per row
        for seq in joining:
            if seq.cancelled:
                seq.leave()
                continue
            if not seq.generate:  # the prompt scored alone; no row joins the batch
                seq.score(batch.run(seq.prompt, every=True)[0])
                seq.finish("length")
                self.metrics.prompt_tokens.inc(len(seq.prompt))
                continue
            logits = batch.prefill(seq.prompt, every=seq.echo)
            if seq.echo:  # (T, V): the prompt's tokens scored, then the next token's logits
                seq.score(logits)
                logits = logits[-1].float()
            rows_logits.append(logits)
            rows.append(seq)
            self.metrics.prompt_tokens.inc(len(seq.prompt))
            self.metrics.prompt_tokens_cached.inc(batch.cached)
            self.metrics.batch_size.labels("prefill").observe(1)
            self.metrics.batch_tokens.labels("prefill").observe(len(seq.prompt) - batch.cached)
        kept, tokens = [], []
        for i, (seq, row_logits) in enumerate(zip(rows, rows_logits, strict=True)):
            if seq.cancelled:
                seq.leave()
                continue
            token = seq.choose(row_logits)
            if not seq.generated:
                self.metrics.time_to_first_token.observe(time.monotonic() - seq.arrived)
            if seq.logprobs is not None:
                seq.emit(("logprobs", scored(row_logits[None], [token], seq.logprobs)))
            self.metrics.generated.inc()
            if seq.accept(token) is None:
                kept.append(i)
                tokens.append(token)
        if len(kept) < len(rows):
            batch.keep(kept)
            rows = [rows[i] for i in kept]
        if not rows:
            return [], torch.zeros(0)
        self.metrics.batch_size.labels("decode").observe(len(rows))
        self.metrics.batch_tokens.labels("decode").observe(len(rows))
        start = time.perf_counter()
        logits = batch.step(tokens)
        self.metrics.time_per_output_token.observe(time.perf_counter() - start)
        return rows, logits
