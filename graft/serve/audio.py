"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's speech to text, answered by
a Whisper model (graft/generation/speech.py, the Transcriber ``graft transcribe`` runs).

    curl -s localhost:8000/v1/audio/transcriptions -F file=@hello.wav -F language=en

The body is a multipart form, as OpenAI's clients send it: ``file`` (WAV, FLAC, OGG...: what
soundfile reads), ``language`` (the spoken language's code; without it, each window's language is
detected as Whisper does), ``response_format``
(json or text), ``temperature`` (0: greedy, the only one) and ``model`` (accepted, not used). A
field the server does not know or cannot honour (``prompt``, ``timestamp_granularities``, another
format) is a 422 that names it. Each upload is cut into 30-second windows, which go through the
token-budget queue: windows of requests with the same language and task are decoded together.
"""

from __future__ import annotations

import tempfile
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from graft.errors import GraftError
from graft.serve.http import HTTPError

FORMATS = ("json", "text")
# what /docs shows of the form (the handler reads it itself, to name a field it does not know)
FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG..."},
                        "model": {"type": "string", "description": "Accepted, not used."},
                        "language": {
                            "type": "string",
                            "description": "The spoken language (default: detected).",
                        },
                        "response_format": {"type": "string", "enum": list(FORMATS)},
                        "temperature": {"type": "number", "enum": [0]},
                    },
                }
            }
        },
    }
}
FIELDS = ("file", "model", "language", "response_format", "temperature")
REFUSED = {  # OpenAI's fields graft does not honour, and why
    "prompt": "a previous text to continue is not supported; send the audio alone",
    "timestamp_granularities[]": "graft transcribes without timestamps",
    "timestamp_granularities": "graft transcribes without timestamps",
    "stream": "the text comes whole",
}


def read_upload(data: bytes, name: str) -> Any:
    """An uploaded file's samples (graft.speech.read_audio, through a temporary file); its errors
    name the upload, not the temporary file."""
    from graft.speech import read_audio

    with tempfile.NamedTemporaryFile(prefix="graft-upload-") as f:
        f.write(data)
        f.flush()
        try:
            return read_audio(f.name)
        except GraftError as e:
            raise HTTPError(422, "file: " + str(e).replace(f.name, name), "file") from None


def register(app: FastAPI, state: Any) -> None:
    """Add the audio endpoints to ``app``; ``state`` is the app's graft.serve.app.State."""

    async def speech(request: Request, task: str) -> Any:
        s = state.model()
        t = s.transcriber
        if t is None:
            raise HTTPError(400, f"{s.name} is {s.kind}: speech to text needs a Whisper model")
        if not request.headers.get("content-type", "").startswith(
            ("multipart/form-data", "application/x-www-form-urlencoded")
        ):
            raise HTTPError(
                422, "the body is a multipart form (file=@audio.wav), as OpenAI's clients send it"
            )
        form = await request.form()
        for key in form:
            if key in REFUSED:
                raise HTTPError(422, f"{key}: {REFUSED[key]}", key)
            if key not in FIELDS:
                raise HTTPError(422, f"{key}: not a field of this endpoint ({', '.join(FIELDS)})", key)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPError(422, "file: an audio file is required (file=@audio.wav)", "file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in FORMATS:
            raise HTTPError(
                422, f"response_format: {fmt!r} is not one of {', '.join(FORMATS)}", "response_format"
            )
        try:
            temperature = float(form.get("temperature") or 0)
        except ValueError:
            raise HTTPError(422, "temperature: not a number", "temperature") from None
        if temperature != 0:
            raise HTTPError(422, "temperature: graft transcribes greedily; send 0", "temperature")
        language = str(form["language"]) if form.get("language") else None  # None: detected, as OpenAI does
        if t.prompt.languages and language is not None and language not in t.prompt.languages:
            known = ", ".join(sorted(t.prompt.languages))
            raise HTTPError(
                422, f"language: {language!r} is not one of the model's languages ({known})", "language"
            )
        if task not in t.prompt.tasks and t.prompt.tasks:
            raise HTTPError(400, f"{s.name} cannot {task} (an English-only model transcribes)")
        samples = read_upload(await upload.read(), upload.filename or "file")
        text = await transcribed(samples, language, task)
        return PlainTextResponse(text + "\n") if fmt == "text" else {"text": text}

    async def transcribed(samples: Any, language: str | None, task: str) -> str:
        """The clip's text: its 30-second windows decoded on the queue (each window's language
        detected where ``language`` is None), their texts joined."""
        from graft.generation.speech import windows

        t = state.model().transcriber
        pieces = windows(samples, t.features.n_samples)
        frames = t.model.config.encoder.max_positions  # what one window costs the encoder
        rows = await state.on_queue(
            "transcribe", pieces, [frames] * len(pieces), {"language": language, "task": task}
        )
        return " ".join(p for p in t.texts(rows) if p)

    @app.post("/v1/audio/transcriptions", tags=["OpenAI"], openapi_extra=FORM)
    async def transcriptions(request: Request) -> Any:
        """OpenAI's speech to text (a multipart form: file, language, response_format json or text)."""
        return await speech(request, "transcribe")

    @app.post("/v1/audio/translations", tags=["OpenAI"], openapi_extra=FORM)
    async def translations(request: Request) -> Any:
        """OpenAI's speech to English text (a multipart form: file, response_format json or text)."""
        return await speech(request, "translate")
