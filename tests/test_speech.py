"""Speech: audio reading and resampling, Whisper's log-mel features (against transformers'
WhisperFeatureExtractor), speech data sets, and WER/CER (against jiwer)."""

from __future__ import annotations

import math
import random

import jiwer
import numpy as np
import pytest
import soundfile

from graft.data import detect_format, load_records
from graft.errors import GraftError
from graft.metrics import cer, compute_metrics, normalize_transcript, wer
from graft.speech import WhisperFeatures, read_audio, resample
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
    # a header's rate of 1 Hz would make 10 samples 10 s of 16 kHz audio (a few KB: gigabytes)
    soundfile.write(tmp_path / "slow.wav", np.zeros((10, 1), np.float32), 1)
    with pytest.raises(
        GraftError, match="slow.wav: its sampling rate is 1 Hz; graft reads audio of 4000 Hz or more$"
    ):
        read_audio(tmp_path / "slow.wav")


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


# ---- speech data sets (graft.data's audio format) --------------------------------------------


def write_clips(folder, names=("a", "b"), rate: int = 16000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        soundfile.write(folder / f"{name}.wav", tone(rate, 0.1 + 0.05 * i), rate)


def plain(records) -> list[dict]:
    """Records with their samples as lists, for equality."""
    return [{**r, "audio": np.round(r["audio"], 6).tolist()} for r in records]


def test_speech_records_from_tables_and_folders(tmp_path, monkeypatch) -> None:
    """Every layout gives the same records: 16 kHz samples, the transcript, the path as written;
    relative paths start from the data file's folder, not from where graft runs."""
    write_clips(tmp_path / "clips", rate=22050)
    clip = {name: read_audio(tmp_path / "clips" / f"{name}.wav") for name in ("a", "b")}
    expected = [{"audio": clip["a"], "text": "text a", "id": "clips/a.wav"},
                {"audio": clip["b"], "text": "text b", "id": "clips/b.wav"}]  # fmt: skip
    (tmp_path / "data.csv").write_text('audio,text\nclips/a.wav,text a\nclips/b.wav,"text b"\n')
    (tmp_path / "data.jsonl").write_text(
        '{"path": "clips/a.wav", "transcript": "text a"}\n{"path": "clips/b.wav", "transcript": "text b"}\n'
    )
    (tmp_path / "data.tsv").write_text("file_name\tsentence\nclips/a.wav\ttext a\nclips/b.wav\ttext b\n")
    monkeypatch.chdir(tmp_path / "clips")  # elsewhere: the paths still resolve
    for name in ("data.csv", "data.jsonl", "data.tsv"):
        assert detect_format(tmp_path / name) == "audio"
        assert plain(load_records(tmp_path / name)) == plain(expected), name
    for name in ("a", "b"):
        (tmp_path / "clips" / f"{name}.txt").write_text(f"text {name}\n")
    folder = [{**r, "id": r["id"].removeprefix("clips/")} for r in expected]
    assert detect_format(tmp_path / "clips") == "audio"
    assert plain(load_records(tmp_path / "clips")) == plain(folder)  # transcripts beside the files
    (tmp_path / "clips" / "metadata.csv").write_text("file_name,text\nb.wav,second\n")
    assert plain(load_records(tmp_path / "clips")) == plain([{**folder[1], "text": "second"}])
    # a path column is audio only when it names audio files; a plain text CSV stays text
    (tmp_path / "text.csv").write_text("path,text\nnotes/a.txt,hello\n")
    assert detect_format(tmp_path / "text.csv") == "csv"


def test_speech_records_name_the_column_the_user_maps(tmp_path) -> None:
    write_clips(tmp_path)
    (tmp_path / "data.csv").write_text("wav,words\na.wav,x\n")
    (record,) = load_records(tmp_path / "data.csv", "audio", columns={"wav": "audio", "words": "text"})
    assert record["text"] == "x" and len(record["audio"]) == 1600


def test_speech_data_errors_name_the_file_row_and_column(tmp_path) -> None:
    write_clips(tmp_path, ("a",))
    good = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(good[: len(good) // 2])  # a WAV cut short: soundfile reads half
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    data = tmp_path / "data.csv"

    def error(csv: str, **options) -> str:
        data.write_text(csv)
        with pytest.raises(GraftError) as e:
            list(load_records(data, "audio", **options))
        return str(e.value)

    assert error("audio,text\na.wav,x\nnope.wav,y\n") == (
        f"{data}, line 3, column 'audio': audio file {tmp_path / 'nope.wav'} does not exist"
    )
    assert error("audio,text\na.wav,x\ncut.wav,y\n") == (
        f"{data}, line 3, column 'audio': {tmp_path / 'cut.wav'}: is truncated (its header promises 3200 "
        "bytes of samples, the file holds 1578)"
    )
    assert error("audio,text\njunk.wav,y\n").startswith(
        f"{data}, line 2, column 'audio': {tmp_path / 'junk.wav'}: not an audio file soundfile can read"
    )
    assert error("wav,text\na.wav,x\n") == (
        f"{data}, line 1, column 'audio': no column of audio file paths (looked for 'audio', 'audio_path', "
        "'audio_file', 'path', 'file_name', 'file'; available: 'wav', 'text'); name it with --column "
        "COL=audio (data.columns: {COL: audio} in a recipe)"
    )
    assert error("audio,words\na.wav,x\n", required=("text",)).startswith(
        f"{data}, line 1, column 'text': no such column (available: 'audio', 'words')"
    )
    data.write_text("audio,text\na.wav,x\nnope.wav,y\ncut.wav,z\n")
    stream = load_records(data, "audio", skip_bad_rows=True)
    assert [r["text"] for r in stream] == ["x"]
    assert stream.stats.skipped == {"missing audio": 1, "unreadable audio": 1}


def test_speech_folder_errors(tmp_path) -> None:
    with pytest.raises(GraftError, match="holds no audio files"):
        list(load_records(tmp_path, "audio"))
    write_clips(tmp_path, ("a",))
    with pytest.raises(GraftError) as e:
        list(load_records(tmp_path))
    assert str(e.value) == (
        f"{tmp_path / 'a.wav'}, row 0, column 'text': no transcript a.txt beside it (or give the folder a "
        "metadata.csv of file_name,text)"
    )


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
