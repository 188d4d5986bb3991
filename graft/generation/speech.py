"""Speech in, text out (chapter 9): Whisper transcription over 30-second windows.

Each clip (16 kHz samples) is cut into consecutive 30-second windows; every window becomes log-mel
features (graft.speech), and the decoder starts from the forced prompt <|startoftranscript|>
<|en|> <|transcribe|> <|notimestamps|> and decodes greedily (or by beam search) with the
checkpoint's generation settings: its suppressed tokens, at most max_length tokens in all. A
clip's text is its windows' texts joined by spaces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.generation.config import GenerationConfig, folder_defaults
from graft.generation.loop import generate
from graft.models.whisper import WhisperPrompt
from graft.speech import WhisperFeatures
from graft.tasks.speech import check_window
from graft.tokenizer import Tokenizer


def windows(samples: np.ndarray, length: int) -> list[np.ndarray]:
    """Consecutive pieces of ``length`` samples (the last one shorter; one, empty or not, at least)."""
    n = max(1, math.ceil(len(samples) / length))
    return [samples[i * length : (i + 1) * length] for i in range(n)]


class Transcriber:
    """A Whisper model with what it needs around it: its tokenizer, feature extractor, prompt and
    generation settings (all read from the model's folder; the tokenizer can be given)."""

    def __init__(
        self,
        model: Any,
        folder: str | Path,
        tokenizer: Any = None,
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> None:
        if getattr(model.config, "family", None) != "whisper" or getattr(model, "task", None) != "seq2seq":
            family = getattr(model.config, "family", "?")
            raise GraftError(
                f"{folder}: a {family} model cannot transcribe speech (transcribe needs Whisper)"
            )
        path = Path(folder) / "generation_config.json"
        defaults = folder_defaults(folder)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_folder(folder)
        self.features = WhisperFeatures.from_folder(folder)
        check_window(model.config, self.features, str(folder))
        self.prompt = WhisperPrompt.from_generation_config(defaults, str(path))
        max_length = defaults.get("max_length") or model.config.decoder.max_positions
        self.max_length = min(int(max_length), model.config.decoder.max_positions)
        self.max_new_tokens = max_new_tokens  # a cap below max_length (training's evaluation)
        self.config = GenerationConfig.for_model(model, defaults, **options)

    def tokens(
        self,
        clips: Sequence[np.ndarray],
        language: str | None = "en",
        task: str = "transcribe",
        batch_size: int = 8,
    ) -> list[list[list[int]]]:
        """Each clip's windows' new tokens, up to (not including) the end of the text (``language``
        None: each window's detected)."""
        pieces = [(i, w) for i, clip in enumerate(clips) for w in windows(clip, self.features.n_samples)]
        out: list[list[list[int]]] = [[] for _ in clips]
        for batch in _chunks(pieces, batch_size):
            features = self.features([w for _, w in batch])  # (B, M, frames)
            for (i, _), row in zip(batch, self.windows_tokens(features, language, task), strict=True):
                out[i].append(row)
        return out

    def from_features(
        self, features: torch.Tensor, language: str | None = "en", task: str = "transcribe"
    ) -> list[list[int]]:
        """(B, M, frames) windows' features -> each window's new tokens, up to the end of the text."""
        start = self.prompt.tokens(language, task)
        new = self.max_length - len(start)
        config = self.config.replace(max_new_tokens=min(new, self.max_new_tokens or new))
        prompt = torch.tensor([start] * features.shape[0])  # (B, P)
        return [_until_eos(row, config.eos_ids) for row in self.decode(prompt, features, config)]

    def detect(self, features: torch.Tensor) -> list[str]:
        """(B, M, frames) windows' features -> each window's spoken language: the likeliest of the
        model's language tokens after <|startoftranscript|>, as Whisper detects it ("en" for an
        English-only model)."""
        if not self.prompt.languages:
            return ["en"] * features.shape[0]
        codes = list(self.prompt.languages)
        ids = torch.tensor([self.prompt.languages[code] for code in codes])  # (L,)
        start = torch.full((features.shape[0], 1), self.prompt.start)  # (B, 1)
        with torch.inference_mode():
            logits = self.model(input_features=features, decoder_input_ids=start).logits[:, -1]  # (B, V)
        return [codes[i] for i in logits[:, ids].argmax(-1).tolist()]

    def windows_tokens(
        self, features: torch.Tensor, language: str | None = "en", task: str = "transcribe"
    ) -> list[list[int]]:
        """``from_features``, with each window's language detected first where ``language`` is None."""
        languages = self.detect(features) if language is None else [language] * features.shape[0]
        rows: list[list[int]] = [[] for _ in languages]
        for code in dict.fromkeys(languages):  # the windows of each language together, in order
            picked = [i for i, c in enumerate(languages) if c == code]
            for i, row in zip(picked, self.from_features(features[picked], code, task), strict=True):
                rows[i] = row
        return rows

    def decode(
        self, prompt: torch.Tensor, features: torch.Tensor, config: GenerationConfig
    ) -> list[list[int]]:
        """Each window's new tokens after ``prompt`` (B, P). (An exported folder's transcriber,
        graft.export.backend.ExportedTranscriber, runs its graphs here instead.)"""
        ids = generate(self.model, None, config=config, decoder_input_ids=prompt, input_features=features)
        return ids[:, prompt.shape[1] :].tolist()

    def texts(self, tokens: Sequence[Sequence[int]]) -> list[str]:
        """Token rows -> texts, special tokens skipped."""
        return [self.tokenizer.decode(list(ids), skip_special_tokens=True).strip() for ids in tokens]

    def __call__(
        self,
        clips: Sequence[np.ndarray],
        language: str | None = "en",
        task: str = "transcribe",
        batch_size: int = 8,
    ) -> list[str]:
        """Each clip's text."""
        texts = []
        for parts in self.tokens(clips, language, task, batch_size):
            texts.append(" ".join(p for p in self.texts(parts) if p))
        return texts


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    return next((row[:k] for k, token in enumerate(row) if token in eos), row)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
