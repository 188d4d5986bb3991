"""Text generation (chapter 9): greedy, sampling and beam search over the key/value cache.

One ``GenerationConfig`` describes a run. Logits processors (repetition penalty, temperature,
top-k, top-p, min-p) are written once, in ``process``, and serve sampling and beam search alike.
A ``Decoder`` owns the cache and the attention mask of a batch: ``prefill`` runs the prompt
once, each ``step`` runs one new token per row. ``stream`` yields the tokens of every row as
they come; ``generate`` returns prompt + new tokens; ``beam_search`` keeps ``num_beams``
hypotheses per row and reorders the cache when it picks which of them go on.

Prompts of different lengths are left-padded: position ids count from each row's first real
token, so padding changes nothing in the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graft.errors import GraftError, did_you_mean
from graft.nn import KVCache
from graft.nn.linear import frozen_weights, weight_store, weights_signature
from graft.tasks import TaskModel

log = logging.getLogger("graft")

TRUNCATION = ("left", "error")


@dataclass
class GenerationConfig:
    """How to decode. Defaults: greedy, 20 new tokens, the model's eos tokens."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the text (CTRL)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(log p) / length ** length_penalty
    early_stopping: bool | str = False  # True: stop at num_beams finished; "never": exact search
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None  # needs the tokenizer
    seed: int | None = None
    truncation: str = "left"  # a prompt too long for the context window: "left" (warn) or "error"
    compile: bool = False  # decode with a compiled step (bf16/fp16 weights on CPU): see compiled_step

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("num_beams", self.num_beams >= 1, ">= 1"),
            ("early_stopping", self.early_stopping in (True, False, "never"), "True, False or 'never'"),
            ("truncation", self.truncation in TRUNCATION, "'left' or 'error'"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise GraftError(f"generation: {name}={getattr(self, name)!r} must be {rule}")
        if self.num_beams > 1 and self.do_sample:
            raise GraftError("generation: beam search does not sample; use num_beams=1 with do_sample")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_id(self) -> int:
        """What finished rows are filled with: the pad token, else the first eos token, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes``; unknown names are an error that suggests the right one."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise GraftError(f"generation: unknown option {key!r}{did_you_mean(key, names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_model(
        cls, model: TaskModel, defaults: dict[str, Any] | None = None, **changes: Any
    ) -> GenerationConfig:
        """The model's eos/pad tokens, then ``defaults`` (a generation_config.json), then ``changes``."""
        cfg = model.config
        base = cls(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        return base.replace(**known).replace(**changes)


# ---------------------------------------------------------------------------------------------
# Logits processors: (N, V) float32 scores -> scores. ``seen`` (N, V) marks tokens already in a row.
# ---------------------------------------------------------------------------------------------


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: seen tokens' positive scores are divided by ``penalty``, negative ones multiplied."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k best tokens."""
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[:, -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probabilities sum to at least p (nucleus sampling)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)  # (N, V), ascending
    remove = cumulative <= 1 - p
    remove[:, -1] = False  # always keep the best token
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least min_p times as probable as the best one."""
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    remove.scatter_(1, probs.argmax(-1, keepdim=True), False)
    return scores.masked_fill(remove, -float("inf"))


def process(scores: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Every processor the config asks for, in transformers' order (penalty first, then the samplers')."""
    if config.repetition_penalty != 1.0:
        scores = penalize_repetition(scores, seen, config.repetition_penalty)
    if config.do_sample:
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k:
            scores = top_k_filter(scores, config.top_k)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p)
        if config.min_p:
            scores = min_p_filter(scores, config.min_p)
    return scores


# ---------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def fit_context(
    model: TaskModel, input_ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make room for max_new_tokens in the context window: cut the prompt from the left, or refuse."""
    window = model.config.max_positions
    room = window - config.max_new_tokens
    length = input_ids.shape[1]
    if length <= room:
        return input_ids, mask
    if config.truncation == "error" or room < 1:
        raise GraftError(
            f"generation: the prompt has {length} tokens and {config.max_new_tokens} new ones were asked for, "
            f"but the context window holds {window} (use truncation='left' or fewer new tokens)"
        )
    log.warning(
        "generation: prompt of %d tokens + %d new ones exceeds the context window (%d); keeping its last %d tokens",
        length,
        config.max_new_tokens,
        window,
        room,
    )
    return input_ids[:, -room:], mask[:, -room:]


PACK_LIMIT = 2 * 2**30  # bytes of weights up to which decoding keeps a packed copy for oneDNN

# torch.compile's options for a decoding step: the graph's kernels called from C++ (inductor's
# cpp_wrapper), and no guards on the model's modules at every call (compiled_step keys each
# graph to one model and its weights instead). Freezing (the weights folded into the graph as
# constants, packed once for oneDNN) is set around each call: dynamo reads it before the options apply.
COMPILE_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
_FOLDED: dict = {}  # frozen_weights' store while compiling: weights are folded, nothing is kept here
_COMPILED = itertools.count()  # compiled steps made so far (each gets a name of its own)


def decode_step(model: TaskModel) -> Callable[..., torch.Tensor]:
    """One decoding step of ``model`` over a fixed-size cache, as a function of tensors only (the
    model is its closure, so that compiled, its weights are the graph's constants)."""

    def step(
        tokens: torch.Tensor,  # (B, 1)
        positions: torch.Tensor,  # (B, 1)
        mask: torch.Tensor,  # (B, 1, 1, capacity) bool: the cache positions each row may attend
        cache: KVCache,  # fixed-size: writes at cache.position
    ) -> torch.Tensor:  # (B, V) float32
        out = model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        )
        return out.logits[:, -1].float()

    return step


def compiled_step(model: TaskModel, batch_size: int) -> Callable[..., torch.Tensor]:
    """``decode_step`` compiled with torch.compile for ``model`` as its weights are now; kept on
    the model, so a chat's turns compile once (and once more per new batch size).

    The graph holds the weights as constants, so it may serve only this model in this state: each
    model, and each new state of its weights (moved, replaced, updated in place, or its modules'
    training mode), gets its own copy of the step's code, since torch.compile keys compiled graphs
    to the code. The cache's length is a dynamic dimension: one graph serves every prompt length.
    """
    signature = (weights_signature(model), tuple(m.training for m in model.modules()))
    kept = model.__dict__.get("_graft_compiled")
    if kept is None or kept[0] != signature:
        step = decode_step(model)
        # a new code object, for compiled graphs of its own; and a new name, since dynamo carries
        # the shapes it saw over to code of the same file, line and name (a dimension that differed
        # between two models would become dynamic)
        name = f"decode_step_{next(_COMPILED)}"
        code = step.__code__.replace(co_name=name, co_qualname=name)
        step = types.FunctionType(code, step.__globals__, name, None, step.__closure__)
        compiled = torch.compile(step, fullgraph=True, options=COMPILE_OPTIONS)

        def run(*args: Any) -> torch.Tensor:
            # fused projections (packing): one matrix multiply over concatenated weights, folded too
            with torch._inductor.config.patch(freezing=True), frozen_weights(_FOLDED):
                return compiled(*args)

        kept = (signature, run, set())
        object.__setattr__(model, "_graft_compiled", kept)  # not a submodule or parameter
    if batch_size not in kept[2]:  # the first step compiles: say why it takes a while
        kept[2].add(batch_size)
        log.info("generation: compiling the decoding step (once per model and batch size; a minute or so)")
    return kept[1]


def check_compilable(model: TaskModel) -> None:
    """A clear error for what a compiled decoding step does not do."""
    weight = next(model.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        raise GraftError(
            "generation: compile is for bfloat16 or float16 weights on CPU (float32 decoding runs at the "
            "speed of its matrix multiplies without it); load the model with dtype=torch.bfloat16"
        )
    if model.body._forward_pre_hooks or model.body._forward_hooks:
        raise GraftError(
            "generation: compile cannot decode through hooks on the model's body (prompt or prefix "
            "tuning); generate without compile"
        )


class Decoder:
    """A batch being decoded: the cache, the attention mask so far and the next positions.

    With ``compile``, the prompt runs as usual and each step through ``compiled_step``, over a
    cache of fixed size (prompt + steps) and a boolean mask of the positions written so far.
    """

    def __init__(
        self,
        model: TaskModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        steps: int,
        compile: bool = False,
    ):
        self.model = model
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.padded = not bool(mask.all())
        # the whole mask, prompt + every step, allocated once; step t reads its first T + t columns
        self.mask = torch.ones(B, T + steps, dtype=torch.long, device=input_ids.device)
        self.mask[:, :T] = mask
        self.length = T
        self.positions = positions_from_mask(mask)  # (B, T)
        self.cache = KVCache(model.config.num_blocks, capacity=T + steps)  # allocated once
        self.input_ids = input_ids
        self.compiled = compiled_step(model, B) if compile else None
        self.visible: torch.Tensor | None = None  # (B, 1, 1, T + steps) bool, compiled steps only
        # weights in oneDNN's layout, packed once (frozen_weights); a second copy of the weights,
        # so only for models whose weights take at most PACK_LIMIT bytes (compiled: in its graph)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.packed = weight_store(model) if weight_bytes <= PACK_LIMIT and not compile else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.mask[:, : self.length] if self.padded else None
        with frozen_weights(self.packed) if self.packed is not None else contextlib.nullcontext():
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=self.positions,
                cache=self.cache,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()  # (B, V)

    def prefill(self) -> torch.Tensor:
        """Run the prompt; the next-token logits of every row, (B, V) float32."""
        logits = self.forward(self.input_ids)
        self.positions = self.positions[:, -1:]
        if self.compiled is not None:  # from now on, the cache keeps its size
            cache, T = self.cache, self.length
            B, capacity = self.mask.shape
            self.visible = torch.zeros(B, 1, 1, capacity, dtype=torch.bool, device=self.mask.device)
            self.visible[:, 0, 0, :T] = self.mask[:, :T].bool()
            cache.position = torch.tensor([T], device=self.mask.device)
            self.any_length()
        return logits

    def any_length(self) -> None:
        """Compile the step for any cache size (prompt + steps), not just this one."""
        for buffer in (*self.cache.keys, *self.cache.values):
            torch._dynamo.maybe_mark_dynamic(buffer, 2)  # (B, nkv, capacity, hd)
        torch._dynamo.maybe_mark_dynamic(self.visible, 3)  # (B, 1, 1, capacity)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,); the next-token logits, (B, V) float32."""
        self.length += 1
        self.positions = self.positions + 1
        if self.compiled is None:
            return self.forward(tokens[:, None])
        self.cache.position.fill_(self.length - 1)
        self.visible[:, 0, 0, self.length - 1] = True
        window = self.model.config.sliding_window
        if window is not None and self.length > window:  # keys that left the window
            self.visible[:, 0, 0, : self.length - window] = False
        logits = self.compiled(tokens[:, None], self.positions, self.visible, self.cache)
        self.cache.lengths = [self.length] * len(self.cache.lengths)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.visible is not None:
            self.visible = self.visible.index_select(0, index)
            self.any_length()


class StopStrings:
    """Marks rows whose text so far ends in a stop string; decodes only a short tail per step."""

    def __init__(self, tokenizer, stops: Sequence[str], rows: int) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.tail = max(len(s) for s in self.stops) + 2  # a token is at least one character
        self.generated: list[list[int]] = [[] for _ in range(rows)]

    def __call__(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        hits = torch.zeros_like(done)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            self.generated[row].append(token)
            text = self.tokenizer.decode(self.generated[row][-self.tail :], skip_special_tokens=False)
            hits[row] = any(stop in text for stop in self.stops)
        return hits


def sampler(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if not config.do_sample or config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def seen_tokens(input_ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens each row's prompt holds (padding excluded)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, input_ids, real)


def resolve(config: GenerationConfig | None, model: TaskModel, changes: dict[str, Any]) -> GenerationConfig:
    if config is None:
        config = GenerationConfig.for_model(model, **changes)
    elif changes:
        config = config.replace(**changes)
    if config.compile:
        check_compilable(model)
    return config


@torch.inference_mode()
def stream(
    model: TaskModel,
    input_ids: torch.Tensor,  # (B, T), left-padded when rows differ in length
    attention_mask: torch.Tensor | None = None,  # (B, T)
    config: GenerationConfig | None = None,
    tokenizer=None,  # needed for stop_strings
    **changes: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time; finished rows get padding.

    Greedy, or sampling with ``do_sample``; for beam search use ``generate``.
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        raise GraftError("generation: beam search cannot stream; call generate()")
    if config.stop_strings and tokenizer is None:
        raise GraftError("generation: stop_strings need the tokenizer")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    input_ids, mask = fit_context(model, input_ids, mask, config)
    decoder = Decoder(model, input_ids, mask, config.max_new_tokens, config.compile)
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)
    pad = torch.tensor(config.pad_id, device=input_ids.device)
    generator = sampler(config, input_ids.device)
    seen = seen_tokens(input_ids, mask, model.config.vocab_size) if config.repetition_penalty != 1.0 else None
    stops = StopStrings(tokenizer, config.stop_strings, input_ids.shape[0]) if config.stop_strings else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    logits = decoder.prefill()
    for step in range(config.max_new_tokens):
        scores = process(logits, seen, config)
        if config.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            tokens = scores.argmax(-1)  # (B,)
        tokens = torch.where(done, pad, tokens)
        yield tokens
        if len(eos):
            done |= torch.isin(tokens, eos)
        if stops is not None:
            done |= stops(tokens, done)
        if step == config.max_new_tokens - 1 or bool(done.all()):
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = decoder.step(tokens)


def generate(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer=None,
    **changes: Any,
) -> torch.Tensor:
    """Prompt followed by the new tokens: (B, T + new). Greedy, sampling or beam search, per ``config``.

    Options can also be given as keywords (``generate(model, ids, max_new_tokens=32, do_sample=True)``).
    When the prompt had to be cut to fit the context window, the result starts with the kept part.
    """
    config = resolve(config, model, changes)
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, config)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    input_ids, mask = fit_context(model, input_ids, mask, config)
    steps = list(stream(model, input_ids, mask, config, tokenizer))
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


@torch.inference_mode()
def beam_search(
    model: TaskModel,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    **changes: Any,
) -> torch.Tensor:
    """The best of ``num_beams`` hypotheses per row: (B, T + new).

    Each step extends every live beam by every token, keeps the best 2 * num_beams (more with
    several eos tokens) candidates, moves those ending in eos to the finished list (scored
    sum(log p) / length ** length_penalty) and goes on with the best num_beams others; the
    cache follows the surviving beams through ``KVCache.reorder``. Same algorithm and stopping
    rule as transformers' beam search, so the same tokens.
    """
    config = resolve(config, model, changes)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    input_ids, mask = fit_context(model, input_ids, mask, config)
    B, K, N = input_ids.shape[0], config.num_beams, config.max_new_tokens
    device = input_ids.device
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(eos)) * K  # candidates kept per row: enough to go on when the best K end
    top_k_mask = torch.arange(C, device=device) < K  # only the best K candidates may finish
    big = -1.0e9
    lp, early = config.length_penalty, config.early_stopping

    decoder = Decoder(model, input_ids, mask, N, config.compile)
    logits = decoder.prefill()
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) every beam starts from its prompt
    decoder.reorder(rows)
    logits = logits.index_select(0, rows)
    seen = seen_tokens(input_ids, mask, model.config.vocab_size).index_select(0, rows)

    running = torch.full((B, K, N), config.pad_id, dtype=torch.long, device=device)  # new tokens per beam
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = big  # all beams are equal at first: let only the first one expand
    finished = running.clone()
    finished_scores = torch.full((B, K), big, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for step in range(N):
        if step:
            logits = decoder.step(running[:, :, step - 1].reshape(-1))
        log_probs = process(F.log_softmax(logits, dim=-1), seen, config)  # (B*K, V)
        V = log_probs.shape[-1]
        totals = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = torch.topk(totals, C)  # (B, C)
        beam, token = top_index // V, top_index % V
        candidates = running.gather(1, beam[:, :, None].expand(B, C, N)).clone()  # (B, C, N)
        candidates[:, :, step] = token
        ends = torch.isin(token, eos) if step + 1 < N else torch.ones_like(token, dtype=torch.bool)

        # the best K candidates that go on
        alive_scores = top_scores + ends.float() * big
        keep = torch.topk(alive_scores, K).indices  # (B, K)
        running = candidates.gather(1, keep[:, :, None].expand(B, K, N))
        running_scores = alive_scores.gather(1, keep)
        source = (beam.gather(1, keep) + batch_offset).view(-1)  # (B*K,) which old beam each one extends

        # candidates that ended join the finished list when they beat its worst member
        scores = top_scores / ((step + 1) ** lp)
        full = is_finished.all(-1, keepdim=True) & (early is True)
        scores = scores + full.float() * big + (~improvable).float() * big
        just_finished = ends & top_k_mask
        scores = scores + (~just_finished).float() * big
        merged_scores = torch.cat([finished_scores, scores], dim=1)  # (B, K + C)
        best = torch.topk(merged_scores, K).indices  # (B, K)
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(B, K, N))
        finished_scores = merged_scores.gather(1, best)
        lengths = torch.cat([finished_lengths, torch.full_like(scores, step + 1, dtype=torch.long)], dim=1)
        finished_lengths = lengths.gather(1, best)
        is_finished = torch.cat([is_finished, just_finished], dim=1).gather(1, best)

        # stop when no live beam can beat the worst finished one (transformers' heuristic), or all ended
        length = N if early == "never" and lp > 0 else step + 1
        best_possible = running_scores[:, :1] / (length**lp)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, big)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if not bool(improvable.any()) or (bool(is_finished.all()) and early is True) or bool(ends.all()):
            break
        decoder.reorder(source)
        seen = seen.index_select(0, source).scatter_(1, running[:, :, step].reshape(-1, 1), True)

    best_len = int(finished_lengths[:, 0].max())
    return torch.cat([input_ids, finished[:, 0, :best_len]], dim=1)


# ---------------------------------------------------------------------------------------------
# Compatibility helpers and text
# ---------------------------------------------------------------------------------------------


def stream_greedy(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy ``stream`` with the few options most callers need."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return stream(model, input_ids, attention_mask, config)


def greedy(
    model: TaskModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt followed by up to max_new_tokens greedy tokens: (B, T + new)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return generate(model, input_ids, attention_mask, config)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded (ids, mask), each (B, T_max)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer, prompts: Sequence[str] | Sequence[list[dict[str, Any]]], chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts (or, with ``chat``, message lists, or texts sent as one user message) -> left-padded ids, mask."""
    rows = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            rows.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        else:
            rows.append(
                tokenizer.encode(prompt, truncation=False, padding=False, return_tensors=None).input_ids[0]
            )
    if not any(rows):
        raise GraftError("generation: the prompt is empty")
    return left_pad(rows, tokenizer.pad_token_id or 0)


def stream_text(tokenizer, tokens: Iterable[int], stop_at: Sequence[int] = ()) -> Iterator[str]:
    """Text pieces as tokens come; a piece is held back while it ends in an incomplete character."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token in stop_at:
            return
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
