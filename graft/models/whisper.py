"""Whisper: a speech encoder-decoder (chapter 9). The encoder reads 30-second log-mel windows
through two convolutions (the second halves the frame rate) and fixed sinusoidal positions; the
decoder is a pre-LN text stack with learned positions and cross-attention. Both stacks' key
projections have no bias, and the output layer is the decoder's token table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graft.errors import GraftError, did_you_mean
from graft.models.registry import (
    ACTIVATIONS_TO_HF,
    MAX_LAYERS,
    Family,
    activation_from_hf,
    flag,
    heads,
    integer,
    number,
    register,
    token_id,
)
from graft.models.weights import WeightMap, pair, per_layer
from graft.nn.config import EncoderDecoderConfig, TransformerConfig

ATTENTION = {"q": "q_proj", "v": "v_proj", "o": "out_proj"}  # and k_proj: a weight, no bias


def layer(stack: str, cross: bool) -> dict[str, str]:
    """One block's HF -> graft names ('{}' is the layer)."""
    at = f"{stack}.layers.{{}}"
    names: dict[str, str] = {}
    for hf_attn, ours in (("self_attn", "attn"), ("encoder_attn", "cross_attn"))[: 1 + cross]:
        for graft_name, hf_name in ATTENTION.items():
            names |= pair(f"{at}.{hf_attn}.{hf_name}", f"{at}.{ours}.{graft_name}")
        names |= pair(f"{at}.{hf_attn}.k_proj", f"{at}.{ours}.k", bias=False)
    names |= pair(f"{at}.self_attn_layer_norm", f"{at}.attn_norm")
    if cross:
        names |= pair(f"{at}.encoder_attn_layer_norm", f"{at}.cross_norm")
    names |= pair(f"{at}.fc1", f"{at}.ffn.up") | pair(f"{at}.fc2", f"{at}.ffn.down")
    return names | pair(f"{at}.final_layer_norm", f"{at}.ffn_norm")


def config_from_hf(hf: dict[str, Any]) -> EncoderDecoderConfig:
    hidden, enc_heads = heads(hf, "d_model", "encoder_attention_heads")
    _, dec_heads = heads(hf, "d_model", "decoder_attention_heads")
    common = dict(
        family="whisper",
        vocab_size=integer(hf, "vocab_size", 51865),
        hidden_size=hidden,
        norm_eps=1e-5,  # transformers' Whisper keeps nn.LayerNorm's default
        prenorm=True,
        final_norm=True,
        key_bias=False,
        activation=activation_from_hf(hf.get("activation_function", "gelu")),
        tie_word_embeddings=flag(hf, "tie_word_embeddings", True),
        dropout=number(hf, "dropout", 0.0, high=1.0),
        attention_dropout=number(hf, "attention_dropout", 0.0, high=1.0),
        pad_token_id=token_id(hf, "pad_token_id", 50257),
        bos_token_id=token_id(hf, "bos_token_id", 50257),
        eos_token_id=token_id(hf, "eos_token_id", 50257),
        hf_config=hf,
    )
    encoder = TransformerConfig(
        **common,
        num_layers=integer(hf, "encoder_layers", 4, high=MAX_LAYERS),
        num_heads=enc_heads,
        intermediate_size=integer(hf, "encoder_ffn_dim", 1536),
        inputs="audio_frames",
        num_mel_bins=integer(hf, "num_mel_bins", 80),
        position="sinusoidal",
        max_positions=integer(hf, "max_source_positions", 1500),  # frames after the stride-2 convolution
    )
    decoder = TransformerConfig(
        **common,
        num_layers=integer(hf, "decoder_layers", 4, high=MAX_LAYERS),
        num_heads=dec_heads,
        intermediate_size=integer(hf, "decoder_ffn_dim", 1536),
        max_positions=integer(hf, "max_target_positions", 448),
        causal=True,
        cross_attention=True,
    )
    return EncoderDecoderConfig(
        encoder, decoder, decoder_start_token_id=token_id(hf, "decoder_start_token_id", 50258)
    )


def config_to_hf(cfg: EncoderDecoderConfig) -> dict[str, Any]:
    enc, dec = cfg.encoder, cfg.decoder
    return {
        "model_type": "whisper",
        "vocab_size": dec.vocab_size,
        "num_mel_bins": enc.num_mel_bins,
        "d_model": dec.hidden_size,
        "encoder_layers": enc.num_layers,
        "decoder_layers": dec.num_layers,
        "encoder_attention_heads": enc.num_heads,
        "decoder_attention_heads": dec.num_heads,
        "encoder_ffn_dim": enc.intermediate_size,
        "decoder_ffn_dim": dec.intermediate_size,
        "max_source_positions": enc.max_positions,
        "max_target_positions": dec.max_positions,
        "activation_function": ACTIVATIONS_TO_HF[dec.activation],
        "scale_embedding": False,
        "tie_word_embeddings": dec.tie_word_embeddings,
        "dropout": dec.dropout,
        "attention_dropout": dec.attention_dropout,
        "pad_token_id": dec.pad_token_id,
        "bos_token_id": dec.bos_token_id,
        "eos_token_id": dec.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "is_encoder_decoder": True,
    }


def weight_map(cfg: EncoderDecoderConfig) -> WeightMap:
    names = pair("encoder.conv1", "encoder.embed.conv1") | pair("encoder.conv2", "encoder.embed.conv2")
    # the encoder's sinusoids are a buffer in graft and a (frozen) parameter in transformers
    names["encoder.embed_positions.weight"] = "encoder.embed.positions"
    names |= pair("decoder.embed_tokens", "decoder.embed.tokens", bias=False)
    names |= pair("decoder.embed_positions", "decoder.embed.positions", bias=False)
    for stack, stack_cfg in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        names |= per_layer(layer(stack, cross=stack == "decoder"), stack_cfg.num_layers)
        names |= pair(f"{stack}.layer_norm", f"{stack}.norm")
    return WeightMap(names, prefix="model.")


WHISPER = register(
    Family(
        name="whisper",
        model_types=("whisper",),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        weight_map=weight_map,
        architectures={"base": "WhisperModel", "seq2seq": "WhisperForConditionalGeneration"},
        encoder_decoder=True,
    )
)

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class WhisperPrompt:
    """What Whisper's decoder is given and kept from, as generation_config.json says: the start
    token, then the language, the task and <|notimestamps|> (the forced tokens); tokens never
    generated (``suppress``) and not generated first (``begin_suppress``)."""

    start: int
    languages: dict[str, int]  # "en" -> the id of <|en|>
    tasks: dict[str, int]  # "transcribe" -> the id of <|transcribe|>
    no_timestamps: int | None
    suppress: tuple[int, ...] = ()
    begin_suppress: tuple[int, ...] = ()
    eos: int = 50257

    @classmethod
    def from_generation_config(
        cls, d: dict[str, Any], source: str = "generation_config.json"
    ) -> WhisperPrompt:
        def ids(key: str) -> tuple[int, ...]:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(type(i) is int for i in value):
                raise GraftError(f"{source}: {key} must be a list of token ids")
            return tuple(value)

        def table(key: str) -> dict[str, int]:
            value = d.get(key) or {}
            if not isinstance(value, dict) or not all(type(i) is int for i in value.values()):
                raise GraftError(f"{source}: {key} must map tokens to ids")
            return {k.strip("<|>"): i for k, i in value.items()}

        start, eos = d.get("decoder_start_token_id"), d.get("eos_token_id")
        if type(start) is not int or type(eos) is not int:
            raise GraftError(f"{source}: decoder_start_token_id and eos_token_id must be token ids")
        no_timestamps = d.get("no_timestamps_token_id")
        return cls(
            start, table("lang_to_id"), table("task_to_id"), no_timestamps if type(no_timestamps) is int else None,
            ids("suppress_tokens"), ids("begin_suppress_tokens"), eos,
        )  # fmt: skip

    def tokens(self, language: str | None = "en", task: str = "transcribe") -> list[int]:
        """The forced start of every transcript: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
        (an English-only model has no language or task tokens)."""
        out = [self.start]
        if self.languages and language is not None:
            if language not in self.languages:
                hint = (
                    did_you_mean(language, self.languages) or f" (known: {', '.join(sorted(self.languages))})"
                )
                raise GraftError(f"--language: {language!r} is not one of the model's languages{hint}")
            out.append(self.languages[language])
        if self.tasks:
            if task not in self.tasks:
                raise GraftError(f"--task: {task!r} must be one of {', '.join(self.tasks)}")
            out.append(self.tasks[task])
        if self.no_timestamps is not None:
            out.append(self.no_timestamps)
        return out
