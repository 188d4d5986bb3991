"""Constrained decoding: new text that matches a JSON schema, a regular expression or a Lark
grammar (``GenerationConfig.json_schema``, ``regex``, ``grammar``), token by token.

llguidance, the engine vLLM, SGLang and llama.cpp use, keeps a parser per row over the
tokenizer's vocabulary; at each step it says which tokens may come next (a bit mask: about a
millisecond for a JSON schema over SmolLM2's 49,152 tokens), and every other token's score
becomes -inf before the samplers' filters (``process``), so greedy decoding takes the likeliest
allowed token and sampling draws among the allowed ones. Once the text is complete only
end-of-text may follow. The model is not asked to write JSON: it is kept from writing anything
else, so a prompt that asks for what the schema says still gives the better answer.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.generation.config import GenerationConfig


def llguidance() -> Any:
    try:
        import llguidance as llg
    except ImportError:
        raise GraftError(
            "generation: json_schema, regex and grammar need llguidance (pip install 'graft-ml[serve]')"
        ) from None
    return llg


class Vocabulary:
    """A tokenizer's vocabulary as llguidance reads it, built once (``of``: 0.3 s for SmolLM2's
    49,152 tokens) and shared by every constraint on that model: ``size`` ids (the model's, which may
    pass the tokenizer's), ``eos_ids`` the only ones allowed after a complete text."""

    def __init__(self, tokenizer: Any, size: int, eos_ids: list[int]) -> None:
        llg = llguidance()
        if not eos_ids:
            raise GraftError(
                "generation: constrained decoding needs the model's end-of-text token (eos_token_id)"
            )
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise GraftError("generation: constrained decoding needs a tokenizers (tokenizer.json) tokenizer")
        backend = copy.copy(backend)  # as llguidance.hf does: its JSON without padding or truncation
        backend.no_padding()
        backend.no_truncation()
        self.size, self.eos_ids = size, list(eos_ids)
        try:
            self.tokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=size, eos_token=self.eos_ids)
        except (
            ValueError
        ) as e:  # e.g. a WordPiece decoder: llguidance reads byte-level and SentencePiece ones
            raise GraftError(f"generation: llguidance cannot read this tokenizer ({e})") from None

    @classmethod
    def of(cls, tokenizer: Any, size: int, eos_ids: list[int]) -> Vocabulary:
        """The tokenizer's Vocabulary, built by the first call and kept by a graft Tokenizer
        (``Tokenizer.derived``) for the next ones; any other tokenizer gets a new one each time."""
        if not hasattr(tokenizer, "derived"):
            return cls(tokenizer, size, eos_ids)
        return tokenizer.derived(("llguidance", size, tuple(eos_ids)), lambda: cls(tokenizer, size, eos_ids))


# Between JSON tokens, at most one line break and some indentation: any run of whitespace (JSON's
# own rule, llguidance's default) let a small model write line breaks until max_new_tokens (a
# random GPT-2 did, every time). A schema whose "x-guidance" options (llguidance's) say how to
# treat whitespace (whitespace_flexible, whitespace_pattern) gets what it says instead.
WHITESPACE = {"whitespace_pattern": r"(\r?\n)?[ \t]{0,24}"}


def grammar_of(config: GenerationConfig) -> tuple[str, str]:
    """The config's constraint as llguidance's grammar, and the option it came from."""
    matcher = llguidance().LLMatcher
    if config.json_schema is not None:
        try:
            own = config.json_schema.get("x-guidance", {}) if isinstance(config.json_schema, dict) else {}
            defaults = None if any(key.startswith("whitespace") for key in own) else WHITESPACE
            return matcher.grammar_from_json_schema(config.json_schema, defaults), "json_schema"
        except ValueError as e:
            raise GraftError(f"generation: json_schema: {e}") from None
    if config.regex is not None:
        return matcher.grammar_from_regex(config.regex), "regex"
    if config.grammar is not None:
        return matcher.grammar_from_lark(config.grammar), "grammar"
    raise GraftError("generation: no json_schema, regex or grammar to constrain to")


class Constraint:
    """One parser per row: ``allowed`` the (N, V) tokens each row may take next, ``advance`` after
    each step. A grammar llguidance cannot compile is a GraftError naming the option."""

    def __init__(self, vocabulary: Vocabulary, config: GenerationConfig, rows: int) -> None:
        llg = llguidance()
        grammar, option = grammar_of(config)
        error = llg.LLMatcher.validate_grammar(grammar, vocabulary.tokenizer)
        if error and not error.startswith("WARNING"):  # (several lines for a regex: its caret too)
            reason = " ".join(line.strip() for line in error.splitlines() if line.strip())
            raise GraftError(f"generation: {option}: {reason}")
        self.vocabulary = vocabulary
        self.matchers = [llg.LLMatcher(vocabulary.tokenizer, grammar, log_level=0) for _ in range(rows)]
        self.bits = np.zeros((rows, (vocabulary.size + 31) // 32), dtype=np.int32)  # one bit a token

    def allowed(self) -> torch.Tensor:
        """(N, V) True where a row may take the token next; a row whose parser failed may only end."""
        for row, matcher in zip(self.bits, self.matchers, strict=True):
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        bits = np.unpackbits(self.bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocabulary.size]
        allowed = torch.from_numpy(bits.astype(bool))
        stuck = (~allowed.any(-1)).nonzero()  # (k, 1) rows with nothing allowed
        allowed[stuck, torch.tensor(self.vocabulary.eos_ids)] = True  # (k, eos) broadcast
        return allowed

    def advance(self, tokens: list[int], rows: list[int]) -> None:
        """Each of ``rows`` took its token of ``tokens`` (one per row)."""
        for i in rows:
            if tokens[i] not in self.vocabulary.eos_ids:
                self.matchers[i].consume_token(tokens[i])
