"""Text generation (chapter 9): greedy, sampling and beam search over the key/value cache.

- config.py: ``GenerationConfig``, one validated description of a run;
- processors.py: logits processors (repetition, presence and frequency penalties, logit bias,
  temperature, top-k, top-p, min-p);
- decoder.py: ``Decoder``, the cache, mask and positions of a batch being decoded;
- loop.py: ``stream`` (one step at a time), ``generate`` and ``greedy``;
- beam.py: ``beam_search``;
- text.py: prompts in (``encode_prompts``, left-padded), text out (``stream_text``).

Compiled decoding steps are one of graft's kernels (graft/kernels/decode.py).
"""

from graft.generation.beam import beam_search
from graft.generation.config import GenerationConfig, folder_defaults
from graft.generation.decoder import Decoder, fit_context, positions_from_mask
from graft.generation.loop import generate, greedy, stream
from graft.generation.processors import (
    bias,
    min_p_filter,
    penalize_presence_and_frequency,
    penalize_repetition,
    process,
    top_k_filter,
    top_p_filter,
)
from graft.generation.text import encode_prompts, stream_text

__all__ = [
    "Decoder",
    "GenerationConfig",
    "beam_search",
    "bias",
    "encode_prompts",
    "fit_context",
    "folder_defaults",
    "generate",
    "greedy",
    "min_p_filter",
    "penalize_presence_and_frequency",
    "penalize_repetition",
    "positions_from_mask",
    "process",
    "stream",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]
