"""Audio in: WAV/FLAC/OGG files through soundfile, mixed to mono and resampled to 16 kHz.

The resampler is a windowed-sinc polyphase filter (Hann window, six zero crossings each side,
cut-off at 99% of the lower Nyquist frequency): for a rate ratio of ``new / orig`` reduced by their
gcd, output phase ``j`` of each group of ``new`` samples is one dot product with ``orig`` input
samples' neighbourhood, so the whole signal is one strided convolution.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from graft.errors import GraftError

SAMPLING_RATE = 16000  # Whisper's
ZERO_CROSSINGS = 6  # the sinc's width on each side, in periods of the lower rate
ROLLOFF = 0.99  # the cut-off, as a fraction of the lower rate's Nyquist frequency
# libsndfile reads a WAV cut short without complaint, and logs "data : 32000 (should be 15978)"
_TRUNCATED = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
STREAMING = 0x7FFF0000  # a data size this large is a placeholder written by a stream, not a promise
# the lowest sampling rate read: its samples are upsampled to 16 kHz, and a header that says 1 Hz
# would make a few kilobytes of samples hours of audio (16,000 times the memory)
MIN_RATE = 4000


def read_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A file's samples as float32 mono in [-1, 1] at ``sampling_rate``: (N,)."""
    try:
        import soundfile
    except ImportError:
        raise GraftError("reading audio needs soundfile: pip install 'graft-ml[speech]'") from None
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"{path}: no such audio file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise GraftError(f"{path}: not an audio file soundfile can read (WAV, FLAC, OGG...): {e}") from None
    if data.shape[0] == 0:
        raise GraftError(f"{path}: holds no audio samples")
    if rate < MIN_RATE:
        raise GraftError(
            f"{path}: its sampling rate is {rate} Hz; graft reads audio of {MIN_RATE} Hz or more"
        )
    truncated = _TRUNCATED.search(soundfile.info(str(path)).extra_info)
    if truncated and int(truncated[2]) < int(truncated[1]) < STREAMING:
        raise GraftError(
            f"{path}: is truncated (its header promises {truncated[1]} bytes of samples, the file holds {truncated[2]})"
        )
    return resample(data.mean(axis=1), rate, sampling_rate)


@lru_cache(maxsize=8)
def _kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """The (new, K) filter bank of a orig -> new resampler (rates reduced by their gcd) and its
    half-width in input samples. Row j is the windowed sinc centred on output phase j's time."""
    cutoff = min(orig, new) * ROLLOFF  # in units of the reduced rates
    width = math.ceil(ZERO_CROSSINGS * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # (K,) input times, input periods
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1): each output's offset
    t = ((phases + taps[None]) * cutoff).clamp(-ZERO_CROSSINGS, ZERO_CROSSINGS)  # (new, K)
    window = torch.cos(t * math.pi / ZERO_CROSSINGS / 2) ** 2  # Hann, zero at the last crossing
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    return sinc * window * (cutoff / orig), width  # the gain keeps a constant signal constant


def resample(samples: np.ndarray, orig: int, new: int = SAMPLING_RATE) -> np.ndarray:
    """(N,) samples at ``orig`` Hz -> (ceil(N * new / orig),) samples at ``new`` Hz, float32."""
    if orig <= 0 or new <= 0:
        raise GraftError(f"sampling rates must be positive (got {orig} -> {new})")
    if orig == new:
        return np.asarray(samples, dtype=np.float32)
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    kernel, width = _kernel(o, n)
    x = torch.from_numpy(np.asarray(samples, dtype=np.float64))  # (N,)
    length = x.shape[0]
    x = F.pad(x[None, None], (width, width + o))  # (1, 1, N + 2 width + o)
    y = F.conv1d(x, kernel[:, None], stride=o)  # (1, n, frames): phase j of each output group
    y = y[0].t().reshape(-1)  # (frames * n,), in time order
    return y[: math.ceil(n * length / o)].float().numpy()
