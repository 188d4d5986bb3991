"""What a generation run does: one validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from graft.errors import GraftError, did_you_mean
from graft.io.hf import read_json

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
    # OpenAI's, over the tokens generated so far: minus presence_penalty for each token that has
    # appeared, minus frequency_penalty times its count (0 = off; -2..2)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100..100)
    num_beams: int = 1
    no_repeat_ngram_size: int = 0  # 0 = off; n: no n-gram appears twice in a row's sequence
    min_new_tokens: int = 0  # eos is not allowed before this many new tokens
    # encoder-decoders: the decoder's first token; what it must say first (mBART's language) and last
    # (BART ends at max length with eos); forced tokens further on are given as decoder_input_ids
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    # never generated, and not as the first new token (Whisper's generation_config.json has both)
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    length_penalty: float = 1.0  # beam scores are sum(log p) / length ** length_penalty
    early_stopping: bool | str = False  # True: stop at num_beams finished; "never": exact search
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None  # needs the tokenizer
    seed: int | None = None
    truncation: str = "left"  # a prompt too long for the context window: "left" (warn) or "error"
    compile: bool = False  # decode with a compiled step (bf16/fp16 weights on CPU): see compiled_step
    # constrained decoding (graft/generation/constrain.py: llguidance, and the tokenizer): the new
    # text matches a JSON schema ({"type": "object"}: any JSON object), a regular expression, or a
    # Lark grammar; at most one of the three
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("logit_bias", all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()), "in [-100, 100]"),
            ("num_beams", self.num_beams >= 1, ">= 1"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0"),
            ("min_new_tokens", self.min_new_tokens >= 0, ">= 0"),
            ("early_stopping", self.early_stopping in (True, False, "never"), "True, False or 'never'"),
            ("truncation", self.truncation in TRUNCATION, "'left' or 'error'"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise GraftError(f"generation: {name}={getattr(self, name)!r} must be {rule}")
        if self.num_beams > 1 and self.do_sample:
            raise GraftError("generation: beam search does not sample; use num_beams=1 with do_sample")
        constraints = [
            name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None
        ]
        if len(constraints) > 1:
            raise GraftError(f"generation: {' and '.join(constraints)}: give at most one constraint")
        if constraints and self.num_beams > 1:
            raise GraftError(
                f"generation: {constraints[0]} constrains greedy decoding or sampling, not beam search"
            )
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

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
        cls, model: nn.Module, defaults: dict[str, Any] | None = None, **changes: Any
    ) -> GenerationConfig:
        """The model's eos/pad tokens (an encoder-decoder's decoder start and forced tokens, read from its
        config.json as transformers does), then ``defaults`` (a generation_config.json), then ``changes``."""
        cfg = model.config
        base = cls(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        if hasattr(cfg, "decoder_start_token_id"):  # an EncoderDecoderConfig
            hf = cfg.hf_config
            base = base.replace(
                decoder_start_token_id=cfg.decoder_start_token_id,
                forced_bos_token_id=hf.get("forced_bos_token_id"),
                forced_eos_token_id=hf.get("forced_eos_token_id"),
            )
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        return base.replace(**known).replace(**changes)


def folder_defaults(folder: str | Path) -> dict[str, Any]:
    """A model folder's generation_config.json ({} without one): the settings GenerationConfig.for_model
    takes as ``defaults``. A graft export copies the file, so an exported folder reads the same."""
    return read_json(Path(folder) / "generation_config.json", missing_ok=True)
