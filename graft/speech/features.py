"""Whisper's input features: 30-second windows of 16 kHz audio as log-mel spectrograms.

Each clip is padded with silence (or cut) to 30 s, framed by a 400-sample (25 ms) Hann window every
160 samples (10 ms), turned into power spectra, summed into 80 (or 128) mel bands by Slaney-style
triangular filters, and compressed: log10, floored at 8 below the clip's loudest value, then
scaled as (x + 4) / 4. These are the values transformers' WhisperFeatureExtractor computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.speech.audio import SAMPLING_RATE


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def mel_filters(n_mels: int, n_fft: int, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters, evenly spaced on the mel scale from 0 to 8 kHz,
    each normalized to unit area (Slaney)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))  # (n_mels + 2,)
    bins = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)  # (F,) each FFT bin's frequency
    widths = np.diff(edges)  # (n_mels + 1,)
    slopes = edges[None, :] - bins[:, None]  # (F, n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]  # (F, n_mels)
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))  # (F, n_mels)


@dataclass(frozen=True)
class WhisperFeatures:
    """The feature extractor: ``features(clips)`` -> (B, n_mels, 3000) for 30-second windows."""

    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds per window
    sampling_rate: int = SAMPLING_RATE

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    @cached_property
    def filters(self) -> torch.Tensor:
        return torch.from_numpy(mel_filters(self.n_mels, self.n_fft, self.sampling_rate)).float().T  # (M, F)

    @classmethod
    def from_folder(cls, folder: str | Path) -> WhisperFeatures:
        """The extractor a model folder's preprocessor_config.json describes (defaults without one)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GraftError(f"{path}: is not valid JSON ({e})") from None
        keys = {"feature_size": "n_mels", "n_fft": "n_fft", "hop_length": "hop_length",
                "chunk_length": "chunk_length", "sampling_rate": "sampling_rate"}  # fmt: skip
        values = {}
        for key, name in keys.items():
            if key in d:
                if type(d[key]) is not int or d[key] < 1:
                    raise GraftError(f"{path}: {key} must be a positive integer, not {d[key]!r}")
                values[name] = d[key]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """preprocessor_config.json's keys (transformers' WhisperFeatureExtractor's), for a saved model."""
        return {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "processor_class": "WhisperProcessor",
            "feature_size": self.n_mels,
            "sampling_rate": self.sampling_rate,
            "hop_length": self.hop_length,
            "chunk_length": self.chunk_length,
            "n_fft": self.n_fft,
            "n_samples": self.n_samples,
            "nb_max_frames": self.n_frames,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": False,
        }

    def __call__(self, clips: list[np.ndarray]) -> torch.Tensor:
        """(B, n_mels, n_frames) log-mel features of each clip, padded with silence or cut to one window."""
        batch = np.zeros((len(clips), self.n_samples), dtype=np.float32)  # (B, N)
        for i, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)[: self.n_samples]
            batch[i, : clip.shape[0]] = clip
        return log_mel(torch.from_numpy(batch), self)


def log_mel(samples: torch.Tensor, features: WhisperFeatures | None = None) -> torch.Tensor:
    """(B, N) float32 samples -> (B, n_mels, N // hop) Whisper log-mel features."""
    f = features or WhisperFeatures()
    window = torch.hann_window(f.n_fft)
    stft = torch.stft(
        samples, f.n_fft, f.hop_length, window=window, return_complex=True
    )  # (B, F, frames + 1)
    power = (
        stft[..., :-1].abs() ** 2
    ).contiguous()  # (B, F, frames): the last frame is dropped, as Whisper does
    mel = f.filters @ power  # (B, M, frames)
    log = mel.clamp(min=1e-10).log10()
    floor = log.amax(dim=(1, 2), keepdim=True) - 8.0  # (B, 1, 1): 80 dB below each clip's loudest
    return (torch.maximum(log, floor) + 4.0) / 4.0
