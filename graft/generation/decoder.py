"""The decoding state of a batch: the cache, the mask, the positions; and what every loop shares."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from graft.errors import GraftError
from graft.generation.config import GenerationConfig
from graft.kernels import kernels_of
from graft.kernels.decode import CompiledDecoding
from graft.nn import EncoderDecoder, KVCache
from graft.tasks import TaskModel

log = logging.getLogger("graft")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def fit_context(
    model: TaskModel, input_ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make room for max_new_tokens in the context window: cut the prompt from the left, or refuse."""
    window = model.config.max_positions - model.body.virtual_tokens  # a prompt-tuned model's take room too
    room = window - config.max_new_tokens
    length = input_ids.shape[1]
    if length <= room:
        return input_ids, mask
    if config.truncation == "error" or room < 1:
        raise GraftError(
            f"generation: the prompt has {length} tokens and {config.max_new_tokens} new ones were asked for, "
            f"but the context window holds {window} (use --truncation left, or fewer new tokens)"
        )
    log.warning(
        "generation: prompt of %d tokens + %d new ones exceeds the context window (%d); keeping its last %d tokens",
        length,
        config.max_new_tokens,
        window,
        room,
    )
    return input_ids[:, -room:], mask[:, -room:]


def check_compilable(model: TaskModel) -> None:
    """A clear error for what a compiled decoding step does not do."""
    if is_encoder_decoder(model):
        raise GraftError("generation: compile is for decoder-only models; generate without it")
    if kernels_of(model) is None:
        raise GraftError(
            "generation: compile runs on graft's kernels, which this model was loaded without "
            "(load it with kernels on: graft.kernels.optimize(model))"
        )
    weight = next(model.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        raise GraftError(
            "generation: compile is for bfloat16 or float16 weights on CPU (float32 decoding runs at the "
            "speed of its matrix multiplies without it); load the model in bfloat16 (--dtype bfloat16, dtype=torch.bfloat16 in Python)"
        )
    if model.body.virtual_tokens:
        raise GraftError(
            "generation: compile cannot decode a prompt-tuned model (its virtual tokens do not fit the "
            "compiled step's fixed-size cache); generate without compile"
        )


class Decoder:
    """A batch being decoded: the cache, the attention mask so far and the next positions.

    With ``compile``, the prompt runs as usual and each step through the kernels' compiled step
    (graft.kernels.decode), over a cache of fixed size (prompt + steps).
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
        self.input_ids = input_ids
        self.compiled = CompiledDecoding(model, B) if compile else None
        layers, capacity = model.config.num_blocks, T + steps  # the cache is allocated once
        if self.compiled is not None:
            self.cache = self.compiled.new_cache(layers, capacity)
        else:
            self.cache = KVCache(layers, capacity=capacity)
        # the kernels' packed weights, kept on the model between calls (compiled: in its graph)
        kernels = kernels_of(model)
        self.kernels = kernels if kernels is not None and not compile else None
        self.packed = self.kernels.store(model) if self.kernels is not None else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.mask[:, : self.length] if self.padded else None
        frozen = self.kernels.frozen(self.packed) if self.packed is not None else contextlib.nullcontext()
        with frozen:
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
            self.compiled.start(self.mask, self.length)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,); the next-token logits, (B, V) float32."""
        self.length += 1
        self.positions = self.positions + 1
        if self.compiled is None:
            return self.forward(tokens[:, None])
        return self.compiled.step(tokens, self.positions, self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.compiled is not None:
            self.compiled.reorder(index)


class EncoderDecoderState:
    """An encoder-decoder's batch being decoded, with a Decoder's interface (prefill, step, reorder).

    The encoder runs once, here; the decoder reads ``prompt`` (the start token, or forced tokens
    such as Whisper's language and task) at prefill, then one token a step. Its cache keeps the
    decoder's own keys and values and, from the first call, each layer's cross-attention keys and
    values of the encoder's output. Rows are not padded: the encoder's mask covers its padding.
    """

    def __init__(
        self,
        model: TaskModel,
        encoder_inputs: dict[str, torch.Tensor],  # input_ids and attention_mask, or input_features
        prompt: torch.Tensor,  # (B, T) the decoder's first tokens
        steps: int,
    ) -> None:
        self.model = model
        self.input_ids = prompt
        self.mask = encoder_inputs.get("attention_mask")  # (B, S) the encoder's
        kernels = kernels_of(model)
        self.kernels = kernels
        self.packed = kernels.store(model) if kernels is not None else None
        body = model.body
        with self.frozen():
            self.encoded = body.encode(**encoder_inputs)
        self.cache = body.new_cache(capacity=prompt.shape[1] + steps)

    def frozen(self) -> contextlib.AbstractContextManager:
        return self.kernels.frozen(self.packed) if self.packed is not None else contextlib.nullcontext()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.frozen():
            out = self.model(
                attention_mask=self.mask,
                decoder_input_ids=tokens,
                encoder_outputs=self.encoded,
                cache=self.cache,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()  # (B, V)

    def prefill(self) -> torch.Tensor:
        return self.forward(self.input_ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): the cache's, and the encoder's output and mask with them."""
        self.cache.reorder(index)
        hidden = self.encoded.last_hidden_state.index_select(0, index)  # (B', S, H)
        self.encoded = dataclasses.replace(self.encoded, last_hidden_state=hidden)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)


def is_encoder_decoder(model: TaskModel) -> bool:
    return isinstance(model.body, EncoderDecoder)


def start(
    model: TaskModel,
    input_ids: torch.Tensor | None,  # (B, T): a decoder's prompt, or an encoder-decoder's source
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    decoder_input_ids: torch.Tensor | None = None,  # (B, T') an encoder-decoder's forced first tokens
    input_features: torch.Tensor | None = None,  # (B, mel bins, frames) an audio encoder's input
) -> tuple[Decoder | EncoderDecoderState, torch.Tensor]:
    """The decoding state of a batch, and the tokens it starts from (the prompt, or the decoder's
    start tokens), which every loop returns in front of the new ones."""
    if not is_encoder_decoder(model):
        if decoder_input_ids is not None or input_features is not None:
            raise GraftError("generation: decoder_input_ids and input_features are for encoder-decoders")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        input_ids, mask = fit_context(model, input_ids, mask, config)
        return Decoder(model, input_ids, mask, config.max_new_tokens, config.compile), input_ids
    encoder_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_features": input_features,
    }
    encoder_inputs = {k: v for k, v in encoder_inputs.items() if v is not None}
    source = input_ids if input_ids is not None else input_features
    if decoder_input_ids is None:
        first = config.decoder_start_token_id
        if first is None:
            raise GraftError("generation: this model's config.json has no decoder_start_token_id; give one")
        decoder_input_ids = torch.full((source.shape[0], 1), first, dtype=torch.long, device=source.device)
    dec = model.body.config.decoder
    length = decoder_input_ids.shape[1] + config.max_new_tokens
    if dec.position == "learned" and length > dec.max_positions - dec.position_offset:
        raise GraftError(
            f"generation: {decoder_input_ids.shape[1]} start tokens and {config.max_new_tokens} new ones are more "
            f"than the decoder's {dec.max_positions - dec.position_offset} positions (ask for fewer new tokens)"
        )
    return EncoderDecoderState(
        model, encoder_inputs, decoder_input_ids, config.max_new_tokens
    ), decoder_input_ids


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
