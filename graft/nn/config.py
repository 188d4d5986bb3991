"""The one configuration every family maps its Hugging Face config.json onto."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graft.errors import GraftError, did_you_mean

POSITIONS = ("learned", "sinusoidal", "rotary", "relative", "none")
NORMS = ("layer", "rms")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu")
INPUTS = ("tokens", "patches", "audio_frames")  # what the stack's embeddings read (graft.nn.embeddings)


@dataclass
class TransformerConfig:
    """Architecture of one transformer body; families differ only in these values.

    Defaults describe a BERT-style post-LN encoder. Every field is a plain value so the
    config round-trips through JSON/YAML.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads
    max_positions: int = 512

    # Embeddings (chapter 2: token + position (+ segment) embeddings).
    inputs: str = "tokens"  # tokens (ids) | patches (images, ViT) | audio_frames (log-mel features, Whisper)
    image_size: int = 224  # patches: square images of this many pixels a side,
    patch_size: int = 16  # cut into patches of this many pixels a side,
    num_channels: int = 3  # with this many channels
    patch_bias: bool = True  # the patch projection has a bias (ViT; CLIP's has none)
    distillation_token: bool = False  # DeiT: a second learned token after [CLS], read by the teacher's head
    num_mel_bins: int = 80  # audio_frames: features per frame
    embedding_size: int | None = None  # ALBERT: factorized embeddings projected up to hidden_size
    type_vocab_size: int = 0  # BERT segment embeddings; 0 = none
    position: str = "learned"  # learned | sinusoidal | rotary | relative (T5) | none
    positions_from_padding: bool = False  # RoBERTa: position ids count non-pad tokens, from pad_token_id + 1
    position_offset: int = 0  # learned positions start at this row of the table (BART: 2)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size) (mBART, BART's scale_embedding)
    embedding_norm: bool = False  # LayerNorm right after the embedding sum (BERT)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    relative_buckets: int = 32  # T5's relative position bias: buckets and the distance the last one starts at
    relative_max_distance: int = 128

    # Blocks.
    norm: str = "layer"  # layer | rms
    norm_eps: float = 1e-12
    prenorm: bool = False  # False: post-LN (BERT); True: pre-LN (GPT-2, Llama)
    final_norm: bool = False  # a norm after the last block (pre-LN models)
    activation: str = "gelu"
    gated: bool = False  # gated feed-forward (SwiGLU when activation is silu)
    qkv_bias: bool = True
    key_bias: bool = True  # False: the key projection alone has none (Whisper); moot when qkv_bias is False
    out_bias: bool = True
    mlp_bias: bool = True
    causal: bool = False
    attention_scale: float | None = None  # None = 1/sqrt(head_dim)
    scale_by_inverse_layer: bool = False  # GPT-2 option: scores also divided by (layer index + 1)
    sliding_window: int | None = None
    layer_order: list[int] | None = None  # cross-layer sharing (ALBERT): unique block applied at each depth
    cross_attention: bool = False  # every block also attends to an encoder's output (encoder-decoder)
    # Pruned models (graft.compress.prune): self-attention heads and feed-forward widths per block;
    # None = num_heads / intermediate_size in every block
    heads_per_layer: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    # Around the stack.
    pooler: bool = False  # dense + tanh on the first token (BERT, ALBERT)
    tie_word_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # The checkpoint's own config.json, kept so that saving preserves keys graft does not use.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("position", self.position, POSITIONS),
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("inputs", self.inputs, INPUTS),
        ):
            if value not in allowed:
                raise GraftError(f"config: {name}={value!r} is not one of {', '.join(allowed)}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise GraftError(
                    f"config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise GraftError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        self.check_inputs()
        for name, sizes, most in (
            ("heads_per_layer", self.heads_per_layer, self.num_heads),
            ("intermediate_sizes", self.intermediate_sizes, None),
        ):
            if sizes is None:
                continue
            if len(sizes) != self.num_blocks or not all(type(n) is int and n >= 1 for n in sizes):
                raise GraftError(f"config: {name} must list {self.num_blocks} integers >= 1, one per block")
            if most is not None and max(sizes) > most:
                raise GraftError(f"config: {name} has {max(sizes)} heads in a block of {most}")
        if self.heads_per_layer is not None and self.num_kv_heads != self.num_heads:
            raise GraftError(
                "config: heads_per_layer needs one key/value head per query head (no grouped-query)"
            )
        if self.heads_per_layer is not None and self.position == "relative":
            raise GraftError(
                "config: heads_per_layer does not go with position='relative' (one bias per head)"
            )

    def heads(self, layer: int) -> int:
        """Self-attention heads of block ``layer`` (fewer than num_heads once pruned)."""
        return self.heads_per_layer[layer] if self.heads_per_layer is not None else self.num_heads

    def intermediate(self, layer: int) -> int:
        """Feed-forward width of block ``layer`` (smaller than intermediate_size once pruned)."""
        return (
            self.intermediate_sizes[layer] if self.intermediate_sizes is not None else self.intermediate_size
        )

    def check_inputs(self) -> None:
        """Patches and audio frames bring their own positions; token-only options stay off."""
        if self.distillation_token and self.inputs != "patches":
            raise GraftError(f"config: distillation_token is for inputs='patches', not {self.inputs!r}")
        if self.inputs == "tokens":
            return
        for name in ("embedding_size", "type_vocab_size", "positions_from_padding"):
            if getattr(self, name):
                raise GraftError(
                    f"config: {name}={getattr(self, name)!r} is for inputs='tokens', not {self.inputs!r}"
                )
        # ViT and CLIP learn one position per patch (+ [CLS]); Whisper adds fixed sinusoids to frames
        position = "learned" if self.inputs == "patches" else "sinusoidal"
        if self.position != position:
            raise GraftError(
                f"config: inputs={self.inputs!r} needs position={position!r}, not {self.position!r}"
            )
        if self.inputs == "patches" and self.max_positions != self.num_patches + self.prefix_tokens:
            tokens = "[CLS] and the distillation token" if self.distillation_token else "[CLS]"
            raise GraftError(
                f"config: max_positions={self.max_positions} must be {self.num_patches + self.prefix_tokens}"
                f" for inputs='patches' ((image_size {self.image_size} // patch_size {self.patch_size}) ** 2"
                f" patches and {tokens})"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image (inputs="patches")."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_tokens(self) -> int:
        """Learned tokens before the patches (inputs="patches"): [CLS], and DeiT's distillation token."""
        return 1 + self.distillation_token

    @property
    def first_position(self) -> int:
        """The position of an unpadded sequence's first token: RoBERTa numbers from pad_token_id + 1,
        BART's table from position_offset, the rest from 0."""
        return self.pad_token_id + 1 if self.positions_from_padding else self.position_offset

    @property
    def num_blocks(self) -> int:
        """Number of distinct blocks holding weights (fewer than num_layers when layers are shared)."""
        return max(self.layer_order) + 1 if self.layer_order else self.num_layers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TransformerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GraftError(f"{source}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], names)}")
        return cls(**d)


@dataclass
class EncoderDecoderConfig:
    """Two stacks: an encoder over the inputs and a causal decoder whose blocks also attend to the
    encoder's output (T5, BART, Whisper; ViT or an audio encoder feeding a text decoder)."""

    encoder: TransformerConfig
    decoder: TransformerConfig  # cross_attention=True, causal=True
    share_embeddings: bool = False  # one token embedding for both stacks (BART, T5)
    project_context: bool = False  # a linear layer from the encoder's width to the decoder's
    decoder_start_token_id: int | None = None  # what the decoder reads first (T5: pad, BART: eos)

    # what the model as a whole is asked for (loading, saving, generation): the decoder's values
    @property
    def family(self) -> str:
        return self.decoder.family

    @property
    def hf_config(self) -> dict[str, Any]:
        return self.decoder.hf_config

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        return self.decoder.pad_token_id

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.decoder.eos_token_id

    def __post_init__(self) -> None:
        enc, dec = self.encoder, self.decoder
        for name, value, wanted in (
            ("encoder.cross_attention", enc.cross_attention, False),
            ("encoder.causal", enc.causal, False),
            ("decoder.cross_attention", dec.cross_attention, True),
            ("decoder.causal", dec.causal, True),
        ):
            if value != wanted:
                raise GraftError(f"config: {name} must be {str(wanted).lower()} in an encoder-decoder")
        if dec.inputs != "tokens":
            raise GraftError(f"config: decoder.inputs={dec.inputs!r} must be 'tokens' in an encoder-decoder")
        if enc.hidden_size != dec.hidden_size and not self.project_context:
            raise GraftError(
                f"config: encoder.hidden_size {enc.hidden_size} and decoder.hidden_size {dec.hidden_size} differ;"
                " set project_context: true to project the encoder's output"
            )
        if self.share_embeddings:
            if enc.inputs != "tokens":
                raise GraftError(
                    f"config: share_embeddings needs token inputs, not encoder.inputs={enc.inputs!r}"
                )
            for name in ("vocab_size", "embedding_size", "hidden_size"):
                if getattr(enc, name) != getattr(dec, name):
                    raise GraftError(
                        f"config: share_embeddings needs one encoder.{name} and decoder.{name}"
                        f" ({getattr(enc, name)} and {getattr(dec, name)})"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.to_dict(),
            "decoder": self.decoder.to_dict(),
            "share_embeddings": self.share_embeddings,
            "project_context": self.project_context,
            "decoder_start_token_id": self.decoder_start_token_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> EncoderDecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GraftError(f"{source}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], names)}")
        for stack in ("encoder", "decoder"):
            if not isinstance(d.get(stack), dict):
                raise GraftError(f"{source}: {stack} must be a mapping of a transformer's config")
        stacks = {}
        for stack in ("encoder", "decoder"):
            try:
                stacks[stack] = TransformerConfig.from_dict(d[stack], source)
            except GraftError as e:  # "config: position=..." -> "config: decoder: position=..."
                where, _, what = str(e).partition(": ")
                raise GraftError(f"{where}: {stack}: {what}") from None
        return cls(**{**d, **stacks})
