"""Speech (chapter 9): audio files read and resampled to 16 kHz, and Whisper's log-mel features.
Speech data sets (an audio folder, or a CSV/JSON lines file of path,text) are graft.data's audio
format; the Whisper family itself is graft.models.whisper."""

from graft.speech.audio import SAMPLING_RATE, read_audio, resample
from graft.speech.features import WhisperFeatures, log_mel

__all__ = ["SAMPLING_RATE", "WhisperFeatures", "log_mel", "read_audio", "resample"]
