"""``graft transcribe``: speech to text with a Whisper model (chapter 9)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import BackendOpt, ReferenceOpt, app


class Task(StrEnum):
    transcribe = "transcribe"
    translate = "translate"


class Format(StrEnum):
    text = "text"
    jsonl = "jsonl"


@contextlib.contextmanager
def whisper_folder(model: str) -> Iterator[Path]:
    """The model as a HF folder; a CTranslate2 model.bin (or a faster-whisper folder) is converted
    into a temporary one first."""
    from graft.io.ctranslate2 import convert_ctranslate2, ctranslate2_file

    path = ctranslate2_file(model)
    if path is not None:
        with tempfile.TemporaryDirectory(prefix="graft-ct2-") as tmp:
            yield convert_ctranslate2(path, Path(tmp) / "model")
        return
    from graft.io.hf import resolve

    yield resolve(model)


def load_transcriber(model: str, reference: bool, backend: str | None, num_beams: int = 1):
    """graft's Transcriber on MODEL: a Whisper folder, Hub id or CTranslate2 model, or a graft export
    folder (its encoder and decoder graphs, in ONNX Runtime or torch: ``backend``, or its own format)."""
    from graft.export.backend import ExportedTranscriber, is_exported, load_exported

    if backend is not None or is_exported(model):
        return ExportedTranscriber(load_exported(model, backend), model, num_beams=num_beams)
    from graft.generation.speech import Transcriber
    from graft.loading import load_model

    with whisper_folder(model) as folder:
        whisper = load_model(folder, task="seq2seq", kernels=not reference)
        return Transcriber(whisper, folder, num_beams=num_beams)


@app.command()
def transcribe(
    model: Annotated[
        str,
        typer.Argument(
            help="A Whisper model: a Hugging Face folder, a Hub id, a CTranslate2 model.bin, or a graft export folder."
        ),
    ],
    audio: Annotated[
        list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG...); long ones go in 30 s windows.")
    ],
    language: Annotated[
        str,
        typer.Option(
            help="The spoken language's code (en, de, fr...); auto: each 30 s window's is detected."
        ),
    ] = "en",
    task: Annotated[Task, typer.Option(help="transcribe, or translate into English.")] = Task.transcribe,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams (1: greedy).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="30-second windows decoded at once.")] = 8,
    format: Annotated[
        Format, typer.Option(help="text: one line per file; jsonl: {audio, text} per file.")
    ] = Format.text,
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
) -> None:
    """Write what each audio file says, one line per file, in order."""
    from graft.errors import GraftError

    for path in audio:  # before the model loads: a typo should not cost a minute
        if not path.is_file():
            raise GraftError(f"{path}: no such audio file")
    from graft.speech import read_audio

    transcriber = load_transcriber(model, reference, backend, num_beams)
    clips = [read_audio(path) for path in audio]
    spoken = None if language == "auto" else language
    texts = transcriber(clips, language=spoken, task=task.value, batch_size=batch_size)
    for path, text in zip(audio, texts, strict=True):
        typer.echo(
            json.dumps({"audio": str(path), "text": text}, ensure_ascii=False)
            if format is Format.jsonl
            else text
        )


def is_whisper(model: str) -> bool:
    """Whether MODEL names a Whisper model (a folder whose config.json says so, or a CTranslate2 one)."""
    from graft.io.ctranslate2 import ctranslate2_file

    path = Path(model)
    if ctranslate2_file(model) is not None:
        return True
    if path.is_dir():
        try:
            return (
                json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == "whisper"
            )
        except (OSError, ValueError, AttributeError):
            return False  # load_model says what is wrong with it
    return False


def evaluate_speech(
    model: str,
    data: Path,
    out: Path | None,
    batch_size: int,
    reference: bool,
    num_beams: int = 1,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    encoding: str = "auto",
    backend: str | None = None,
) -> None:
    """``graft eval`` for a Whisper model: transcribe a speech data set (graft.data's audio format: a
    CSV/JSON lines file of path,text or an audio folder), print WER and CER (as written, and
    normalized), write metrics.json and predictions.jsonl to --out."""
    from graft.data import load_records
    from graft.errors import GraftError
    from graft.io.atomic import atomic_path, check_output, write_json
    from graft.metrics import compute_metrics

    if fmt not in (None, "audio"):
        raise GraftError(
            f"--format {fmt}: a Whisper model reads speech data (--format audio: audio paths and texts)"
        )
    if out is not None:
        check_output(out, "--out", folder=True)
    stream = load_records(data, "audio", columns, skip_bad_rows, required=("text",), encoding=encoding)
    records = list(stream)  # every file is read (and checked) before the model loads
    transcriber = load_transcriber(model, reference, backend, num_beams)
    texts = transcriber([r["audio"] for r in records], batch_size=min(batch_size, 8))
    metrics = {**compute_metrics("speech", texts, [r["text"] for r in records]), "examples": len(records)}
    typer.echo(json.dumps(metrics))
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record, text in zip(records, texts, strict=True):
            line = {"audio": record["id"], "text": record["text"], "prediction": text}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
