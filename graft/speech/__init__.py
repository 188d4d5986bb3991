"""Speech (chapter 9): audio files read and resampled to 16 kHz, Whisper's log-mel features, and
speech data sets (an audio folder or a CSV of path,text). It stands on graft.nn's audio-frame
embeddings; the Whisper family itself is graft.models.whisper."""

from graft.speech.audio import SAMPLING_RATE, read_audio, resample
from graft.speech.data import read_speech_records
from graft.speech.features import WhisperFeatures, log_mel

__all__ = ["SAMPLING_RATE", "WhisperFeatures", "log_mel", "read_audio", "read_speech_records", "resample"]
