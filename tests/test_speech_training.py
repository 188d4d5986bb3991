"""Speech fine-tuning through graft train: a tiny random Whisper reading 30-second windows learns
from generated WAV files and their transcripts (graft.data's audio format), fully or with LoRA;
accumulation is exact by target tokens; graft eval reports WER and CER equal to jiwer's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from test_ctranslate2 import tiny_whisper
from test_train_helpers import tiny_recipe
from test_whisper import converted

from graft.data import load_records
from graft.loading import load_model
from graft.strategies import apply_strategy
from graft.tasks import TaskModel
from graft.tokenizer import Tokenizer
from graft.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["abc", "ba", "cab", "dead", "bead", "face", "gag", "hid"]  # the tiny tokenizer's letters


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> Path:
    """A tiny random Whisper (its tokenizer, generation and feature settings) over 30 s windows."""
    return converted(
        tmp_path_factory.mktemp("whisper"), tiny_whisper(max_source_positions=1500, biases=False)
    )


@pytest.fixture(scope="module")
def speech_csv(tmp_path_factory) -> Path:
    """Eight tones of different pitch and length at 22,050 Hz, their paths relative to the CSV."""
    root = tmp_path_factory.mktemp("speech")
    (root / "clips").mkdir()
    rng = np.random.default_rng(0)
    rows = ["audio,text"]
    for i, text in enumerate(TEXTS):
        n = 8000 + 2000 * i
        wave = 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * np.arange(n) / 22050) + 0.01 * rng.standard_normal(n)
        soundfile.write(root / "clips" / f"{i}.wav", wave.astype(np.float32), 22050)
        rows.append(f"clips/{i}.wav,{text}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def loss_on(model: TaskModel, folder: Path, data: Path) -> float:
    """The mean loss per target token over the whole data set, in one batch."""
    batch = model.head.collate(list(load_records(data)), Tokenizer.from_folder(folder))
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


@pytest.mark.parametrize("strategy", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_graft_train_fine_tunes_whisper_on_audio_files(whisper, speech_csv, tmp_path, cli, strategy):
    """graft train on a CSV of audio paths: the training loss goes down, evaluation transcribes the
    held-out clips (WER, CER), and the saved model loads and transcribes like its base."""
    done = cli(
        "train", ROOT / "recipes" / "seq2seq-speech.yaml", f"model.path={whisper}", f"data.train={speech_csv}",
        f"train.output={tmp_path / 'run'}", f"strategy.name={strategy}", "train.epochs=3", "train.batch_size=2",
        "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_ratio=0", "data.val_fraction=0.25",
        "task.max_new_tokens=4", "train.plots=false", "-q",
    ).ok()  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"eval/wer", "eval/cer", "eval/wer_normalized", "eval/loss"} <= set(result), result
    trained = load_model(tmp_path / "run" / "model", kernels=False)
    assert loss_on(trained, whisper, speech_csv) < loss_on(
        load_model(whisper, kernels=False), whisper, speech_csv
    )
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "run" / "model" / name).is_file(), name


def train(folder: Path, data: Path, out: Path, batch_size: int, accumulate: int) -> TaskModel:
    model, tok = load_model(folder, kernels=False), Tokenizer.from_folder(folder)
    recipe = tiny_recipe(
        out,
        train={"max_steps": 2, "batch_size": batch_size, "accumulate": accumulate},
        optim={"name": "sgd", "lr": 0.5},
    )
    records = list(load_records(data))[:4]  # transcripts of 3, 2, 3 and 4 tokens
    Trainer(model, recipe, records, lambda r: model.head.collate(r, tok), quiet=True).fit()
    return model


def test_accumulation_weighs_target_tokens_exactly(whisper, speech_csv, tmp_path):
    """Micro-batches of one clip each (transcripts of different lengths) step as the whole batch."""
    big = train(whisper, speech_csv, tmp_path / "big", 4, 1)
    small = train(whisper, speech_csv, tmp_path / "small", 1, 4)
    changed = 0
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for a, b in zip(big.state_dict().values(), load_model(whisper).state_dict().values(), strict=True):
        changed += not torch.equal(a, b)
    assert changed > 10  # the steps moved the weights


def test_lora_trains_only_the_adapters(whisper, speech_csv, tmp_path):
    model, tok = load_model(whisper, kernels=False), Tokenizer.from_folder(whisper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_strategy(model, "lora")
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    recipe = tiny_recipe(
        tmp_path / "run", train={"max_steps": 3, "batch_size": 4}, optim={"name": "sgd", "lr": 0.5}
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(
        model, recipe, list(load_records(speech_csv)), lambda r: model.head.collate(r, tok), quiet=True
    ).fit()
    for name, p in model.named_parameters():
        if name in lora:
            continue
        assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in lora)


def test_graft_eval_reports_wer_and_cer_equal_to_jiwer(whisper, speech_csv, tmp_path, cli):
    folder = Path(shutil.copytree(whisper, tmp_path / "whisper"))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["suppress_tokens"] = list(range(21, 30))  # the random model says letters, not specials
    (folder / "generation_config.json").write_text(json.dumps(generation))
    metrics = json.loads(cli("eval", folder, "--data", speech_csv, "--out", tmp_path / "ev").ok().stdout)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS and [r["audio"] for r in rows] == [
        f"clips/{i}.wav" for i in range(8)
    ]
    predictions = [r["prediction"] for r in rows]
    assert metrics["examples"] == 8 and any(predictions)
    assert metrics["wer"] == pytest.approx(jiwer.wer(TEXTS, predictions), abs=1e-12)
    assert metrics["cer"] == pytest.approx(jiwer.cer(TEXTS, predictions), abs=1e-12)


def test_speech_training_errors_name_the_file_and_column(whisper, speech_csv, tmp_path, cli):
    broken = speech_csv.parent / "broken.csv"
    good = speech_csv.read_text().splitlines()
    broken.write_text("\n".join([*good[:3], "clips/missing.wav,x", *good[3:]]) + "\n")
    line = cli(
        "train", ROOT / "recipes" / "seq2seq-speech.yaml", f"model.path={whisper}", f"data.train={broken}",
        f"train.output={tmp_path / 'run'}",
    ).error_line()  # fmt: skip
    assert line == (
        f"error: {broken}, line 4, column 'audio': audio file {speech_csv.parent / 'clips' / 'missing.wav'} "
        "does not exist"
    )
    untranscribed = speech_csv.parent / "untranscribed.csv"
    untranscribed.write_text("audio\n" + "".join(f"clips/{i}.wav\n" for i in range(8)))
    line = cli(
        "train", ROOT / "recipes" / "seq2seq-speech.yaml", f"model.path={whisper}", f"data.train={untranscribed}",
        f"train.output={tmp_path / 'run2'}",
    ).error_line()  # fmt: skip
    assert line.startswith(f"error: {untranscribed}: no 'text' column, which training a seq2seq model needs")
    line = cli("eval", whisper, "--data", speech_csv, "--format", "csv").error_line()
    assert (
        line
        == "error: --format csv: a Whisper model reads speech data (--format audio: audio paths and texts)"
    )
