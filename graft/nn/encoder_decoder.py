"""Encoder-decoder models (T5, BART, Whisper): two stacks joined by cross-attention.

The encoder reads the inputs once; every block of the causal decoder also attends to the
encoder's output. Decoding step by step, one ``KVCache`` holds the decoder's own keys and
values, growing by a position a step, and the keys and values each layer's cross-attention
projected from the encoder's output at the first step, read as they are after that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graft.nn.attention import KVCache
from graft.nn.config import EncoderDecoderConfig
from graft.nn.transformer import Transformer, TransformerOutput


@dataclass
class Seq2SeqOutput:
    last_hidden_state: torch.Tensor  # (B, T, H) the decoder's
    encoder_last_hidden_state: torch.Tensor  # (B, S, He)
    encoder_attentions: tuple[torch.Tensor, ...] | None = None  # each encoder layer's (B, nh, S, S)
    decoder_attentions: tuple[torch.Tensor, ...] | None = None  # each decoder layer's (B, nh, T, past + T)
    cross_attentions: tuple[torch.Tensor, ...] | None = None  # each decoder layer's (B, nh, T, S)
    cache: KVCache | None = None


class EncoderDecoder(nn.Module):
    """An encoder stack and a decoder stack with cross-attention, configured by EncoderDecoderConfig."""

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Transformer(cfg.encoder)
        self.decoder = Transformer(cfg.decoder)
        if cfg.share_embeddings:  # one table, reached from both stacks (and saved under both names)
            self.decoder.embed.tokens = self.encoder.embed.tokens
        h_enc, h_dec = cfg.encoder.hidden_size, cfg.decoder.hidden_size
        self.project = nn.Linear(h_enc, h_dec) if cfg.project_context else None

    def new_cache(self, capacity: int = 64) -> KVCache:
        """An empty cache for decoding step by step."""
        return KVCache(self.config.decoder.num_blocks, capacity)

    def encode(
        self,
        input_ids: torch.Tensor | None = None,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, S), 1 = real token
        pixel_values: torch.Tensor | None = None,  # (B, C, height, width), an encoder over patches
        input_features: torch.Tensor | None = None,  # (B, mel bins, frames), an encoder over audio frames
        output_attentions: bool = False,
    ) -> TransformerOutput:
        return self.encoder(
            input_ids,
            attention_mask,
            output_attentions=output_attentions,
            pixel_values=pixel_values,
            input_features=input_features,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, S), 1 = real token of the encoder's input
        decoder_input_ids: torch.Tensor | None = None,  # (B, T)
        decoder_attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = real token
        encoder_outputs: TransformerOutput | None = None,  # from ``encode``: the encoder runs once a sequence
        cache: KVCache | None = None,  # from ``new_cache``, to decode step by step
        output_attentions: bool = False,
        pixel_values: torch.Tensor | None = None,  # (B, C, height, width)
        input_features: torch.Tensor | None = None,  # (B, mel bins, frames)
    ) -> Seq2SeqOutput:
        """The decoder's last hidden states for ``decoder_input_ids``, attending to the encoder's
        output (padded encoder positions masked). With a cache, ``decoder_input_ids`` are the
        positions after those already in it."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids, attention_mask, pixel_values, input_features, output_attentions
            )
        context = encoder_outputs.last_hidden_state  # (B, S, He)
        if self.project is not None:
            context = self.project(context)  # (B, S, H)
        out = self.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            context=context,
            context_mask=attention_mask,
        )
        attentions = out.attentions or ()  # per decoder layer: self-attention's, then cross-attention's
        return Seq2SeqOutput(
            out.last_hidden_state,
            encoder_outputs.last_hidden_state,
            encoder_outputs.attentions,
            attentions[0::2] if output_attentions else None,
            attentions[1::2] if output_attentions else None,
            cache,
        )
