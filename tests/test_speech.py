"""Speech: audio reading and resampling, Whisper's log-mel features (against transformers'
WhisperFeatureExtractor), speech data sets, and WER/CER (against jiwer)."""

from __future__ import annotations

import math
import random

import jiwer
import numpy as np
import pytest
import soundfile

from graft.errors import GraftError
from graft.metrics import cer, compute_metrics, normalize_transcript, wer
from graft.speech import WhisperFeatures, read_audio, read_speech_records, resample
from graft.speech.features import mel_filters


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * math.pi * hz * t)).astype(np.float32)


# ---- resampling and reading ------------------------------------------------------------------


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_and_the_length(orig: int) -> None:
    x = tone(orig, 1.0, hz=1000.0)
    y = resample(x, orig, 16000)
    assert y.dtype == np.float32 and y.shape == (math.ceil(len(x) * 16000 / orig),)
    expected = tone(16000, len(y) / 16000, hz=1000.0)
    inner = slice(200, -200)  # the ends see the zero padding
    assert np.abs(y[inner] - expected[inner]).max() < 2e-3


def test_resample_removes_what_the_new_rate_cannot_hold() -> None:
    y = resample(tone(48000, 1.0, hz=12000.0), 48000, 16000)  # above 8 kHz: must not alias to 4 kHz
    assert np.abs(y[200:-200]).max() < 1e-2


def test_read_audio_mixes_and_resamples(tmp_path) -> None:
    stereo = np.stack([tone(22050, 0.5), -tone(22050, 0.5) * 0.5], axis=1)  # (N, 2)
    soundfile.write(tmp_path / "a.flac", stereo, 22050)
    soundfile.write(tmp_path / "a.wav", stereo, 22050, subtype="PCM_16")
    for name in ("a.flac", "a.wav"):
        got = read_audio(tmp_path / name)
        expected = resample(stereo.mean(axis=1), 22050, 16000)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


def test_read_audio_errors(tmp_path) -> None:
    with pytest.raises(GraftError, match=f"^{tmp_path / 'none.wav'}: no such audio file$"):
        read_audio(tmp_path / "none.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(GraftError, match=f"^{tmp_path / 'bad.wav'}: not an audio file soundfile can read"):
        read_audio(tmp_path / "bad.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(GraftError, match="empty.wav: holds no audio samples$"):
        read_audio(tmp_path / "empty.wav")


# ---- log-mel features ------------------------------------------------------------------------


def test_mel_filters_equal_transformers() -> None:
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        ref = mel_filter_bank(201, n_mels, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
        assert np.abs(mel_filters(n_mels, 400) - ref).max() < 1e-12


@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_equal_whisper_feature_extractor(n_mels: int) -> None:
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    clips = [
        tone(16000, 3.0) + 0.01 * rng.standard_normal(48000).astype(np.float32),
        rng.standard_normal(16000 * 31).astype(np.float32) * 0.1,  # longer than a window: cut
        np.zeros(800, np.float32),  # silence
        resample(tone(44100, 2.0, 300.0), 44100),
    ]
    ref = WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=16000, return_tensors="pt")
    got = WhisperFeatures(n_mels=n_mels)(clips)
    assert got.shape == ref.input_features.shape == (4, n_mels, 3000)
    assert (got - ref.input_features).abs().max() < 1e-4


def test_features_from_a_model_folder(tmp_path) -> None:
    assert WhisperFeatures.from_folder(tmp_path) == WhisperFeatures()
    (tmp_path / "preprocessor_config.json").write_text('{"feature_size": 128, "hop_length": 160}')
    assert WhisperFeatures.from_folder(tmp_path).n_mels == 128
    (tmp_path / "preprocessor_config.json").write_text('{"feature_size": "80"}')
    with pytest.raises(
        GraftError, match="preprocessor_config.json: feature_size must be a positive integer, not '80'"
    ):
        WhisperFeatures.from_folder(tmp_path)


# ---- speech data sets ------------------------------------------------------------------------


def test_speech_records_from_csv_and_folders(tmp_path) -> None:
    audio = tmp_path / "clips"
    audio.mkdir()
    for name in ("a", "b"):
        soundfile.write(audio / f"{name}.wav", tone(16000, 0.1), 16000)
        (audio / f"{name}.txt").write_text(f"text {name}\n")
    expected = [{"audio": audio / "a.wav", "text": "text a"}, {"audio": audio / "b.wav", "text": "text b"}]
    assert read_speech_records(audio) == expected
    (tmp_path / "data.csv").write_text('path,text\nclips/a.wav,text a\nclips/b.wav,"text b"\n')
    assert read_speech_records(tmp_path / "data.csv") == expected
    (audio / "metadata.csv").write_text("file_name,text\na.wav,first\n")
    assert read_speech_records(audio) == [{"audio": audio / "a.wav", "text": "first"}]


@pytest.mark.parametrize(
    "csv, message",
    [
        (
            "path,txt\nclips/a.wav,x\n",
            "line 1: no 'text' column (the header has ['path', 'txt']); did you mean 'txt'?",
        ),
        ("audio,text\nclips/a.wav,x\n", "line 1: no 'path' column (the header has ['audio', 'text'])"),
        ("path,text\nclips/a.wav,x\nclips/c.wav,y\n", "line 3: audio file"),
        ("path,text\nclips/a.wav\n", "line 2: 1 fields, but the header has 2"),
        ("path,text\n", "has a header but no rows"),
        ("", "is empty (expected a header line: path,text)"),
    ],
)
def test_speech_csv_errors(tmp_path, csv: str, message: str) -> None:
    (tmp_path / "clips").mkdir()
    soundfile.write(tmp_path / "clips" / "a.wav", tone(16000, 0.1), 16000)
    (tmp_path / "data.csv").write_text(csv)
    with pytest.raises(GraftError) as e:
        read_speech_records(tmp_path / "data.csv")
    assert str(e.value).startswith(f"{tmp_path / 'data.csv'}: ") and message in str(e.value)


def test_speech_folder_errors(tmp_path) -> None:
    with pytest.raises(GraftError, match="holds no audio files"):
        read_speech_records(tmp_path)
    soundfile.write(tmp_path / "a.wav", tone(16000, 0.1), 16000)
    with pytest.raises(
        GraftError, match=r"a.wav: has no transcript a.txt beside it \(or give a metadata.csv\)$"
    ):
        read_speech_records(tmp_path)


# ---- WER and CER against jiwer ---------------------------------------------------------------


def random_transcripts(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    words = ["the", "cat", "sat", "on", "a", "mat", "Mat", "sat.", "über", "x"]
    refs, preds = [], []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        pred = [w for w in ref if rng.random() > 0.2]  # deletions
        pred = [rng.choice(words) if rng.random() < 0.2 else w for w in pred]  # substitutions
        pred[rng.randint(0, len(pred)) : 0] = [rng.choice(words)] * rng.randint(0, 2)  # insertions
        gap = rng.choice([" ", "  ", " \t "])  # jiwer's splitting of runs of whitespace
        refs.append(" ".join(ref))
        preds.append(gap.join(pred) + rng.choice(["", " "]))
    return preds, refs


@pytest.mark.parametrize("seed", range(5))
def test_wer_cer_equal_jiwer(seed: int) -> None:
    preds, refs = random_transcripts(random.Random(seed), 30)
    assert wer(preds, refs) == pytest.approx(jiwer.wer(refs, preds), abs=1e-12)
    assert cer(preds, refs) == pytest.approx(jiwer.cer(refs, preds), abs=1e-12)
    metrics = compute_metrics("speech", preds, refs)
    assert (metrics["wer"], metrics["cer"]) == (wer(preds, refs), cer(preds, refs))
    plain = [normalize_transcript(t) for t in preds], [normalize_transcript(t) for t in refs]
    assert metrics["wer_normalized"] == pytest.approx(jiwer.wer(plain[1], plain[0]), abs=1e-12)


@pytest.mark.parametrize(
    "preds, refs",
    [(["x y"], [""]), ([""], [""]), (["a\tb"], ["a b"]), (["x y", "a"], ["", "a"]), ("a b c", "a c")],
)
def test_wer_cer_edge_cases_equal_jiwer(preds, refs) -> None:
    assert wer(preds, refs) == jiwer.wer(refs, preds)
    assert cer(preds, refs) == jiwer.cer(refs, preds)


def test_normalized_transcripts() -> None:
    assert normalize_transcript(" The fox's  'quoted', JUMPS. Don't!") == "the fox's quoted jumps don't"
    assert compute_metrics("speech", ["The fox, jumps."], ["the fox jumps"])["wer_normalized"] == 0


def test_wer_errors() -> None:
    with pytest.raises(GraftError, match="predictions has 1 items but references has 2"):
        wer(["a"], ["a", "b"])
    with pytest.raises(GraftError, match=r"references\[1\] is int, not text"):
        cer(["a", "b"], ["a", 3])
