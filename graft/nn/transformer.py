"""Embeddings and the stack of blocks: the body every family shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from graft.nn.attention import KVCache, Segments, build_mask
from graft.nn.block import Block
from graft.nn.config import TransformerConfig
from graft.nn.embeddings import AudioFrameEmbeddings, InputEmbeddings, PatchEmbeddings
from graft.nn.init import lookup_table
from graft.nn.norm import make_norm
from graft.nn.positions import RelativePositionBias, Rotary, SinusoidalPositions


class Embeddings(InputEmbeddings):
    """Token (+ absolute position) (+ segment) embeddings, then norm, dropout, projection.

    The token lookup is one input among others: ``inputs_embeds`` (B, T, E) replaces it, so
    patches (vision) or audio frames (speech) made into vectors by a module of their own get
    the same positions, norm and dropout. Images and audio have embeddings of their own
    (graft.nn.embeddings), which ``TransformerConfig.inputs`` picks.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.embedding_size or cfg.hidden_size
        self.tokens = lookup_table(cfg.vocab_size, dim)
        self.scale = math.sqrt(cfg.hidden_size) if cfg.scale_embeddings else None
        self.positions: nn.Module | None = None
        if cfg.position == "learned":
            self.positions = lookup_table(cfg.max_positions, dim)
        elif cfg.position == "sinusoidal":
            self.positions = SinusoidalPositions(cfg.max_positions, dim)
        self.token_types = lookup_table(cfg.type_vocab_size, dim) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg, dim) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        # ALBERT: small embeddings, projected up to the hidden size.
        self.project = nn.Linear(dim, cfg.hidden_size) if dim != cfg.hidden_size else None

    def forward(
        self,
        input_ids: torch.Tensor | None,  # (B, T)
        position_ids: torch.Tensor,  # (B, T)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, E), replaces the token lookup
    ) -> torch.Tensor:
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        if self.scale is not None and inputs_embeds is None:
            x = x * self.scale
        if self.positions is not None:
            x = x + self.positions(position_ids)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(position_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        x = self.drop(x)
        return self.project(x) if self.project is not None else x  # (B, T, H)


# TransformerConfig.inputs -> the embeddings reading them
EMBEDDINGS: dict[str, type[InputEmbeddings]] = {
    "tokens": Embeddings,
    "patches": PatchEmbeddings,
    "audio_frames": AudioFrameEmbeddings,
}


@dataclass
class TransformerOutput:
    last_hidden_state: torch.Tensor  # (B, T, H)
    pooled: torch.Tensor | None = None  # (B, H) from the pooler, when the model has one
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer's output
    attentions: tuple[torch.Tensor, ...] | None = None  # each layer's (B, nh, T, S) probabilities
    cache: KVCache | None = None
    rows: torch.Tensor | None = None  # (B, K) positions last_hidden_state holds, when asked for


class Transformer(nn.Module):
    """An encoder (bidirectional) or decoder (causal) stack, configured by TransformerConfig.

    ``embeddings``: the module turning inputs into (B, T, H) vectors (an ``InputEmbeddings``);
    by default the one ``cfg.inputs`` names: tokens, image patches or audio frames. With
    ``cfg.cross_attention`` every block also attends to a ``context`` (the encoder's output,
    in an encoder-decoder model).

    An embeddings module may put learned vectors of its own before every input (prompt tuning's
    wrapper, graft.strategies.prompt, declares ``virtual_tokens``): they open each sequence at
    positions 0..P-1, the caller's positions and mask count only its own tokens, and the output
    leaves them out again.
    """

    def __init__(self, cfg: TransformerConfig, embeddings: InputEmbeddings | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed = embeddings if embeddings is not None else EMBEDDINGS[cfg.inputs](cfg)
        self.rotary = Rotary(cfg) if cfg.position == "rotary" else None
        self.relative = (
            RelativePositionBias(
                cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional=not cfg.causal
            )
            if cfg.position == "relative"
            else None
        )
        self.layers = nn.ModuleList(Block(cfg, i, cross=cfg.cross_attention) for i in range(cfg.num_blocks))
        self.layer_order = cfg.layer_order or list(range(cfg.num_layers))
        self.norm = make_norm(cfg) if cfg.final_norm else None
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.pooler else None
        self.gradient_checkpointing = False

    @property
    def virtual_tokens(self) -> int:
        """Learned positions the embeddings put before every input (prompt tuning), else 0."""
        return getattr(self.embed, "virtual_tokens", 0)

    def pool(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, H) the pooler's output from each sequence's first position of (B, T, H) x (BERT's
        pooler), or None for a body without one."""
        return torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None

    def position_ids(self, input_ids: torch.Tensor | None, past: int, shape: tuple[int, int]) -> torch.Tensor:
        """(B, T) positions of T new tokens after ``past`` cached ones (left-padded rows: generation passes its own)."""
        cfg = self.config
        if cfg.positions_from_padding and input_ids is not None:
            # RoBERTa: real tokens are numbered pad+1, pad+2, ...; padding keeps pad's id.
            real = input_ids.ne(cfg.pad_token_id).long()
            return (torch.cumsum(real, dim=1) + past) * real + cfg.pad_token_id
        start = cfg.first_position
        device = input_ids.device if input_ids is not None else None
        return torch.arange(start + past, start + past + shape[1], device=device).expand(shape[0], -1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor
        | Segments
        | None = None,  # (B, past + T), 1 = real token; or (B, 1, T, S) bool; or Segments (B = 1)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, E)
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        rows: torch.Tensor | None = None,  # (B, K)
        output_attentions: bool = False,
        context: torch.Tensor | None = None,  # (B, S, H) the encoder's output, with cfg.cross_attention
        context_mask: torch.Tensor
        | None = None,  # (B, S), 1 = real token of the encoder's input; or (B, 1, 1, S) bool
        pixel_values: torch.Tensor | None = None,  # (B, C, height, width), with cfg.inputs="patches"
        input_features: torch.Tensor | None = None,  # (B, mel bins, frames), with cfg.inputs="audio_frames"
    ) -> TransformerOutput:
        """The stack's output; last_hidden_state is (B, T, H).

        ``rows``: the positions whose final hidden states the caller reads (a classifier reads
        one). The last block then computes queries, residuals and feed-forward only there,
        since no other position's output reaches the caller: the same values and gradients for
        less work. last_hidden_state is then (B, K, H), ``rows`` is set on the output and
        ``pooled`` reads the first of the rows. Ignored with a cache, output_hidden_states or
        virtual tokens.

        ``output_attentions``: each layer's attention probabilities (B, nh, T, S), computed
        with the attention written out (no fused kernel has them), only when asked for.
        """
        cfg = self.config
        # what the embeddings read: token ids, pixels or audio features
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "input_features": input_features}[
            self.embed.input_name
        ]
        shape = self.embed.sequence_shape(inputs) if inputs_embeds is None else inputs_embeds.shape[:2]
        past = cache.length if cache is not None else 0
        # the embeddings' virtual tokens (see the class docstring): P positions before the caller's,
        # computed by the first call of a sequence (later ones find them in the cache)
        virtual = self.virtual_tokens
        # (past is tested only with virtual tokens: an exported graph's cache length is symbolic)
        new = virtual if virtual and past == 0 else 0
        if position_ids is None:
            position_ids = self.position_ids(inputs, past + new, shape)
        elif virtual:  # the caller's positions count its own tokens
            position_ids = position_ids + virtual
        if new:  # the virtual tokens' own positions, and segment 0
            first = self.position_ids(None, 0, (shape[0], new)).to(position_ids.device)  # (B, P)
            position_ids = torch.cat([first, position_ids], dim=1)  # (B, P + T)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(shape[0], new), token_type_ids], dim=1)
        if virtual and attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = torch.cat([attention_mask.new_ones(shape[0], virtual), attention_mask], dim=1)
        x = self.embed(inputs, position_ids, token_type_ids, inputs_embeds)  # (B, P + T, H) when new

        T = x.shape[1]
        if isinstance(attention_mask, Segments) or (attention_mask is not None and attention_mask.dim() == 4):
            mask, is_causal = attention_mask, False  # (B, 1, T, S) bool or texts end to end: used as given
        else:
            padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            if cfg.causal and padding is None and cfg.sliding_window is None and (past == 0 or T == 1):
                # SDPA's own causal path needs no mask tensor; one new token may see everything.
                mask, is_causal = None, T > 1
            else:
                mask, is_causal = build_mask(padding, T, past + T, cfg.causal, cfg.sliding_window), False
        rotary = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        if self.relative is not None:  # T5: one learned bias per head and distance, shared by every layer
            if is_causal:
                mask, is_causal = build_mask(None, T, T, True, device=x.device), False
            bias = self.relative(T, past + T, offset=past).to(x.dtype)  # (1, nh, T, S)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))  # (B|1, nh, T, S)
        if context_mask is not None and context_mask.dim() == 2:  # (B, 1, 1, S) bool: used as given
            context_mask = build_mask(context_mask, T, context_mask.shape[1], causal=False)  # (B, 1, 1, S)
        if output_hidden_states or cache is not None or new:
            rows = None

        hidden = [x] if output_hidden_states else None
        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        for n, i in enumerate(self.layer_order):
            block = self.layers[i]
            last = rows if n == len(self.layer_order) - 1 else None
            if last is not None and is_causal:  # the selected queries need their own mask rows
                mask, is_causal = build_mask(None, T, T, True, device=x.device), False
            args = (x, mask, is_causal, rotary, cache, context, context_mask, last, output_attentions)
            if self.gradient_checkpointing and self.training:
                x, probs = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, probs = block(*args)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.extend(probs)
        if self.norm is not None:
            x = self.norm(x)
            if hidden is not None:
                hidden[-1] = x
        pooled = self.pool(x)  # (B, H)
        if new:  # the output has the caller's positions only (the pooler read the first virtual one)
            x = x[:, new:]
            hidden = [h[:, new:] for h in hidden] if hidden is not None else None
        return TransformerOutput(
            x,
            pooled,
            tuple(hidden) if hidden is not None else None,
            tuple(attentions) if attentions is not None else None,
            cache,
            rows,
        )
