"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021): the body is frozen.

- prompt: ``tokens`` trainable vectors are put before the input's token embeddings; the body
  runs on the longer sequence and the virtual positions are removed from its outputs again,
  so the head sees one position per real token (``pooled`` is the pooler on the first virtual
  token, as in PEFT).
- prefix: every block gets ``tokens`` trainable keys and values that each query also attends
  to. They enter through the KV cache interface: a ``PrefixCache`` holds them as the "past"
  of every layer, and the real tokens keep positions 0, 1, ...

Both work as forward (pre-)hooks on the body, so the same code serves every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn import KVCache, Transformer, TransformerOutput
from graft.strategies.base import Strategy, check_positive, register
from graft.tasks.base import body_of

FORWARD_ARGS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "cache")


def call_kwargs(body: Transformer, args: tuple, kwargs: dict) -> dict:
    """The body's forward arguments by name, however it was called; refuses a KV cache."""
    kwargs = {**dict(zip(FORWARD_ARGS, args, strict=False)), **kwargs}
    if kwargs.get("cache") is not None:
        raise GraftError("prompt and prefix tuning do not support decoding with a KV cache yet")
    return kwargs


def sequence_shape(kwargs: dict) -> tuple[int, int]:
    x = kwargs["input_ids"] if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
    return x.shape[0], x.shape[1]


def extend_mask(kwargs: dict, n: int, device) -> torch.Tensor:
    """(B, n + T) attention mask: the n new positions are real."""
    B, T = sequence_shape(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=device)
    return torch.cat([mask.new_ones(B, n), mask], dim=1)


# --------------------------------------------------------------------------------- prompt tuning


class Prompt(nn.Module):
    """``tokens`` trainable input embeddings, (P, E)."""

    def __init__(self, embeddings: nn.Embedding, tokens: int, init: str) -> None:
        super().__init__()
        if init == "vocab":  # copies of random vocabulary embeddings train better than noise
            ids = torch.randint(0, embeddings.num_embeddings, (tokens,))
            weight = embeddings.weight.detach()[ids].clone()
        else:
            weight = torch.randn(tokens, embeddings.embedding_dim, dtype=embeddings.weight.dtype) * 0.02
        self.weight = nn.Parameter(weight.to(embeddings.weight.device))


def add_prompt(body: Transformer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = call_kwargs(body, args, kwargs)
    kwargs.pop("rows", None)  # the virtual tokens shift every position; compute them all
    prompt = body.prompt.weight  # (P, E)
    P = prompt.shape[0]
    B, _ = sequence_shape(kwargs)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = body.embed.tokens(kwargs["input_ids"])  # (B, T, E)
    kwargs["attention_mask"] = extend_mask(kwargs, P, embeds.device)
    kwargs["inputs_embeds"] = torch.cat([prompt.expand(B, -1, -1), embeds], dim=1)  # (B, P + T, E)
    kwargs["input_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], dim=1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        kwargs["position_ids"] = torch.cat([torch.arange(P, device=pos.device).expand(B, -1), pos + P], dim=1)
    return (), kwargs


def drop_prompt(body: Transformer, args: tuple, kwargs: dict, out: TransformerOutput) -> TransformerOutput:
    P = body.prompt.weight.shape[0]
    out.last_hidden_state = out.last_hidden_state[:, P:]
    if out.hidden_states is not None:
        out.hidden_states = tuple(h[:, P:] for h in out.hidden_states)
    return out


@register
@dataclass
class PromptTuning(Strategy):
    """Trainable virtual input tokens; the body and its embeddings are frozen. ``prompt:20``."""

    name = "prompt"
    positional = "tokens"

    tokens: int = 20
    init: str = "vocab"  # vocab: copies of random token embeddings; random: N(0, 0.02)

    def check(self) -> None:
        super().check()
        check_positive(self, "tokens")
        if self.init not in ("vocab", "random"):
            raise GraftError(f"strategy 'prompt': init {self.init!r} is not one of vocab, random")

    def prepare(self, model: nn.Module) -> nn.Module:
        body = body_of(model)
        body.prompt = Prompt(body.embed.tokens, self.tokens, self.init)
        body.register_forward_pre_hook(add_prompt, with_kwargs=True)
        body.register_forward_hook(drop_prompt, with_kwargs=True)
        return model


# --------------------------------------------------------------------------------- prefix tuning


class PrefixCache(KVCache):
    """A read-only "past" of learned keys/values: every layer sees its prefix, then the new tokens."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values  # per block: (B, nkv, P, hd)
        self.lengths = [k.shape[2] for k in keys]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)


class Prefix(nn.Module):
    """Learned keys and values for every block: (blocks, P, nkv * hd) each.

    With ``projection`` > 0 they are produced by a two-layer MLP from P learned vectors
    (the reparameterization of Li & Liang, which trains more stably).
    """

    def __init__(self, body: Transformer, tokens: int, projection: int) -> None:
        super().__init__()
        cfg = body.config
        self.blocks, self.kv_heads, self.head_dim = cfg.num_blocks, cfg.num_kv_heads, cfg.head_dim
        width = cfg.num_kv_heads * cfg.head_dim
        p = next(body.parameters())
        if projection:
            self.embedding = nn.Parameter(torch.randn(tokens, cfg.hidden_size) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.hidden_size, projection),
                nn.Tanh(),
                nn.Linear(projection, 2 * self.blocks * width),
            )
        else:
            self.embedding, self.mlp = None, None
            self.keys = nn.Parameter(torch.randn(self.blocks, tokens, width))
            self.values = nn.Parameter(torch.randn(self.blocks, tokens, width))
        self.to(device=p.device, dtype=p.dtype)

    def cache(self, batch_size: int) -> PrefixCache:
        if self.mlp is not None:
            kv = self.mlp(self.embedding)  # (P, 2 * blocks * width)
            P = kv.shape[0]
            keys, values = kv.view(P, 2, self.blocks, -1).permute(1, 2, 0, 3)  # (blocks, P, width) each
        else:
            keys, values = self.keys, self.values
        P = keys.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:  # (P, width) -> (B, nkv, P, hd)
            return x.view(P, self.kv_heads, self.head_dim).transpose(0, 1).expand(batch_size, -1, -1, -1)

        return PrefixCache([heads(k) for k in keys], [heads(v) for v in values])


def add_prefix(body: Transformer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = call_kwargs(body, args, kwargs)
    B, T = sequence_shape(kwargs)
    cache = body.prefix.cache(B)
    if kwargs.get("position_ids") is None:  # the real tokens keep their own positions
        kwargs["position_ids"] = body.position_ids(kwargs.get("input_ids"), 0, (B, T))
    kwargs["attention_mask"] = extend_mask(kwargs, cache.length, kwargs["position_ids"].device)
    kwargs["cache"] = cache
    return (), kwargs


def hide_prefix_cache(
    body: Transformer, args: tuple, kwargs: dict, out: TransformerOutput
) -> TransformerOutput:
    out.cache = None
    return out


@register
@dataclass
class PrefixTuning(Strategy):
    """Trainable key/value prefixes in every block; the body is frozen. ``prefix:20``."""

    name = "prefix"
    positional = "tokens"

    tokens: int = 20
    projection: int = 0  # > 0: reparameterize through an MLP of this width

    def check(self) -> None:
        super().check()
        check_positive(self, "tokens")

    def prepare(self, model: nn.Module) -> nn.Module:
        body = body_of(model)
        body.prefix = Prefix(body, self.tokens, self.projection)
        body.register_forward_pre_hook(add_prefix, with_kwargs=True)
        body.register_forward_hook(hide_prefix_cache, with_kwargs=True)
        return model
