"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021): the body is frozen.

Both are wrappers that keep the module they replace, so printing the model shows what runs:

- prompt: the body's embeddings become ``PromptEmbeddings`` (``embed.base`` the embeddings,
  ``embed.prompt`` P trainable vectors). The vectors are put before the input's token
  embeddings as virtual tokens at positions 0..P-1; ``Transformer.forward`` makes room for
  them in the positions and the mask and leaves them out of its output, so the head sees one
  position per real token (``pooled`` is the pooler on the first virtual token, as in PEFT).
- prefix: every block's self-attention becomes ``PrefixAttention`` (``attn.base`` the
  attention, ``attn.prefix`` P trainable keys and values) whose queries attend to the prefix
  before the keys of the input (and of the cache, when decoding); the real tokens keep
  positions 0, 1, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn import KVCache, Transformer
from graft.nn.attention import Segments, build_mask, by_rows
from graft.nn.embeddings import InputEmbeddings
from graft.strategies.base import Strategy, check_positive, register
from graft.tasks.base import body_of

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

    def extra_repr(self) -> str:
        return f"tokens={self.weight.shape[0]}, dim={self.weight.shape[1]}"


class PromptEmbeddings(InputEmbeddings):
    """The body's embeddings (kept as ``base``) with a learned prompt put before the input's tokens.

    ``virtual_tokens`` tells ``Transformer.forward`` that P positions open every sequence; it
    then gives ``position_ids`` for all the positions a call computes: (B, P + T) on the first
    call of a sequence, with the prompt's positions first, and (B, T) on later calls, whose
    cache holds the prompt already. The prompt goes through the base embeddings with the
    tokens (positions, norm, dropout), exactly as if its vectors were tokens of the input.
    """

    def __init__(self, base: nn.Module, prompt: Prompt) -> None:
        super().__init__()
        self.base = base
        self.prompt = prompt

    @property
    def virtual_tokens(self) -> int:
        return self.prompt.weight.shape[0]

    def forward(
        self,
        input_ids: torch.Tensor | None,  # (B, T)
        position_ids: torch.Tensor,  # (B, P + T), or (B, T) once the cache holds the prompt
        token_type_ids: torch.Tensor | None = None,  # like position_ids
        inputs_embeds: torch.Tensor | None = None,  # (B, T, E)
    ) -> torch.Tensor:  # (B, P + T, H), or (B, T, H)
        x = self.base.tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        if position_ids.shape[1] > x.shape[1]:
            x = torch.cat([self.prompt.weight.expand(x.shape[0], -1, -1), x], dim=1)  # (B, P + T, E)
        return self.base(None, position_ids, token_type_ids, x)


@register
@dataclass
class PromptTuning(Strategy):
    """Trainable virtual input tokens; the body and its embeddings are frozen. ``prompt:20``."""

    name = "prompt"
    encoder_decoders = False
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
        if body.config.inputs != "tokens":
            raise GraftError(
                f"strategy 'prompt': a {body.config.family} model reads {body.config.inputs}, not tokens"
                " (prompt tuning learns token embeddings; try prefix or lora)"
            )
        prompt = Prompt(body.embed.tokens, self.tokens, self.init)
        body.embed = PromptEmbeddings(body.embed, prompt)
        prompt.requires_grad_(True)
        return model


# --------------------------------------------------------------------------------- prefix tuning


class LayerPrefix(nn.Module):
    """One layer's learned keys and values, (P, nkv * hd) each."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(tokens, width))
        self.values = nn.Parameter(torch.randn(tokens, width))

    def extra_repr(self) -> str:
        return f"tokens={self.keys.shape[0]}, width={self.keys.shape[1]}"

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values  # (P, nkv * hd) each


class PrefixEncoder(nn.Module):
    """The reparameterization of Li & Liang, which trains more stably than free keys and values:
    P learned vectors through a dense layer and tanh, (P, projection); one, shared by every layer."""

    def __init__(self, tokens: int, hidden_size: int, projection: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(tokens, hidden_size) * 0.02)
        self.dense = nn.Linear(hidden_size, projection)

    def extra_repr(self) -> str:
        return f"tokens={self.embedding.shape[0]}"

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.dense(self.embedding))  # (P, projection)


class ProjectedPrefix(nn.Module):
    """One layer's keys and values from the shared ``PrefixEncoder``, by a dense layer of its own."""

    def __init__(self, shared: PrefixEncoder, projection: int, width: int) -> None:
        super().__init__()
        self.shared = shared  # the same module in every layer (its weights are tied, as embeddings can be)
        self.out = nn.Linear(projection, 2 * width)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(self.shared()).chunk(2, dim=-1)  # (P, nkv * hd) each


class PrefixedCache:
    """Attention's cache interface (``update``) for one call of one layer: the layer's prefix,
    then the positions of the model's cache (when decoding), then the new ones."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: KVCache | None) -> None:
        self.keys, self.values, self.cache = keys, values, cache  # (B, nkv, P, hd) each

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            k, v = self.cache.update(layer, k, v)  # (B, nkv, past + T, hd)
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)  # (B, nkv, P + ..., hd)


def prefixed_mask(
    mask: torch.Tensor | None, is_causal: bool, tokens: int, q_len: int, device: torch.device
) -> torch.Tensor | None:
    """The attention mask with ``tokens`` keys before the others that every query may attend to."""
    if mask is None and not is_causal:
        return None  # every query sees every key, the prefix's too
    if mask is None:
        mask = build_mask(None, q_len, q_len, causal=True, device=device)  # (1, 1, T, T)
    if mask.dtype == torch.bool:
        lead = mask.new_ones(*mask.shape[:-1], tokens)
    else:  # an additive bias (relative positions): none for the prefix
        lead = mask.new_zeros(*mask.shape[:-1], tokens)
    return torch.cat([lead, mask], dim=-1)  # (B|1, 1|nh, T, P + S)


class PrefixAttention(nn.Module):
    """An attention layer (kept as ``base``) whose queries also attend to ``prefix``'s learned
    keys and values, put before the layer's own and given to it through its cache interface."""

    def __init__(self, base: nn.Module, prefix: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.prefix = prefix

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor | None = None,  # see Attention.forward
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # as Attention.forward; probabilities (B, nh, T, P + S)
        if isinstance(mask, Segments):  # texts end to end: each row of them gets the prefix
            return by_rows(self, x, mask, rotary, output_attentions)
        base = self.base
        B = x.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (P, nkv * hd) -> (B, nkv, P, hd)
            return t.view(t.shape[0], base.num_kv_heads, base.head_dim).transpose(0, 1).expand(B, -1, -1, -1)

        keys, values = self.prefix()
        mask = prefixed_mask(mask, is_causal, keys.shape[0], x.shape[1], x.device)
        past = PrefixedCache(heads(keys), heads(values), cache)
        return base(x, mask, False, rotary, past, context, rows, output_attentions)


def add_prefixes(body: Transformer, tokens: int, projection: int) -> None:
    cfg = body.config
    width = cfg.num_kv_heads * cfg.head_dim
    p = next(body.parameters())
    shared = PrefixEncoder(tokens, cfg.hidden_size, projection) if projection else None
    for block in body.layers:
        prefix = LayerPrefix(tokens, width) if shared is None else ProjectedPrefix(shared, projection, width)
        block.attn = PrefixAttention(block.attn, prefix.to(device=p.device, dtype=p.dtype))


@register
@dataclass
class PrefixTuning(Strategy):
    """Trainable key/value prefixes in every block; the body is frozen. ``prefix:20``."""

    name = "prefix"
    encoder_decoders = False
    positional = "tokens"

    tokens: int = 20
    projection: int = 0  # > 0: reparameterize through an MLP of this width

    def check(self) -> None:
        super().check()
        check_positive(self, "tokens")
        if self.projection < 0:
            raise GraftError(f"strategy 'prefix': option 'projection' must be >= 0, got {self.projection}")

    def prepare(self, model: nn.Module) -> nn.Module:
        body = body_of(model)
        add_prefixes(body, self.tokens, self.projection)
        for block in body.layers:
            block.attn.prefix.requires_grad_(True)
        return model
