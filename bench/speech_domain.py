"""Adapting whisper-base to a domain it does not know well: spoken sentences about transformers.

The sentences are the book's 200 questions and their answers (bench/data/book-questions.jsonl),
split into sentences: real, varied technical English (LoRA, softmax, GELU, tokenizers, BERT...).
Sentences with digits, symbols or abbreviations (e.g., 16x16, $d_k$, 97%) are left out, since
how they are spoken and how they are written differ. espeak-ng speaks every sentence (a synthetic
voice Whisper rarely heard). The split is by question: all the sentences of one question and its
answer are held out together, so no held-out sentence is in training and neighbouring sentences
do not leak; the out-of-training-vocabulary rate of the held-out words says how new they are.

whisper-base (faster-whisper's weights, converted by graft) is measured on the held-out clips
before and after LoRA fine-tuning on the training clips: word error rate as written and
normalized (case and punctuation aside). LoRA (r 16) sits on the decoder's self- and
cross-attention queries and values; the encoder stays frozen, so each clip's encoder output is
computed once and reused by every epoch. The clips are read back through graft's audio data
source (a metadata.csv of path,text beside the WAV files), as ``graft train`` reads them.

    python bench/speech_domain.py [--train 400] [--test 120] [--epochs 4] [--small]

Ends with one JSON line; exits non-zero if it could not run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common
from bench.common import BOOK_QUESTIONS, emit  # noqa: E402
from bench.seq2seq_speech import speak, whisper_base  # noqa: E402

SPEAKABLE = re.compile(r"[A-Za-z ,.?'()\-:;\"]+")  # no digits, %, /, $, brackets: said and written alike
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
SKIP = ("e.g", "i.e", "et al", "etc.")


def groups(seed: int = 0) -> list[list[str]]:
    """The book's questions, each with its answer's sentences: [[question, sentence, ...], ...],
    speakable sentences of 4 to 40 words only, in a seeded order."""
    out = []
    for line in BOOK_QUESTIONS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        sentences = [row["question"], *SPLIT.split(row["answer"])]
        kept = [
            s.strip()
            for s in sentences
            if SPEAKABLE.fullmatch(s) and not any(a in s for a in SKIP) and 4 <= len(s.split()) <= 40
        ]
        if kept:
            out.append(kept)
    random.Random(seed).shuffle(out)
    return out


def split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Held-out sentences from whole questions (first n_test sentences' worth), training from the rest."""
    test: list[str] = []
    train: list[str] = []
    for group in groups(seed):
        (test if len(test) < n_test else train).extend(group)
    return train[:n_train], test[:n_test]


def oov_rate(train: list[str], test: list[str]) -> tuple[float, float]:
    """(share of held-out word tokens, share of held-out word types) never seen in training."""
    from graft.metrics import normalize_transcript

    seen = {w for t in train for w in normalize_transcript(t).split()}
    tokens = [w for t in test for w in normalize_transcript(t).split()]
    types = set(tokens)
    return sum(w not in seen for w in tokens) / len(tokens), len(types - seen) / len(types)


def write_metadata(folder: Path, texts: list[str], clips: list[Path]) -> Path:
    path = folder / "metadata.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([[c.relative_to(folder).as_posix(), t] for c, t in zip(clips, texts, strict=True)])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=400, help="training sentences (at most)")
    parser.add_argument("--test", type=int, default=120, help="held-out sentences")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--small", action="store_true", help="16 training and 8 held-out clips, 1 epoch")
    args = parser.parse_args()
    if args.small:
        args.train, args.test, args.epochs = 16, 8, 1

    from graft.data import load_records
    from graft.generation.speech import Transcriber
    from graft.loading import load_model
    from graft.metrics import compute_metrics
    from graft.strategies import apply_strategy
    from graft.tasks.speech import collate_speech
    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    train_texts, test_texts = split(args.train, args.test)
    oov_tokens, oov_types = oov_rate(train_texts, test_texts)
    print(
        f"{len(train_texts)} training and {len(test_texts)} held-out sentences; held-out words unseen in "
        f"training: {oov_tokens:.1%} of tokens, {oov_types:.1%} of distinct words"
    )
    with tempfile.TemporaryDirectory(prefix="bench-domain-") as tmp_name:
        tmp = Path(tmp_name)
        folder = whisper_base(tmp)
        data = {}
        for name, texts in (("train", train_texts), ("test", test_texts)):
            (tmp / name).mkdir()
            speak(tmp / name, texts)  # clip0.wav, clip1.wav... in that folder
            paths = [tmp / name / f"clip{i}.wav" for i in range(len(texts))]
            data[name] = list(load_records(write_metadata(tmp / name, texts, paths), format="audio"))
        test_clips = [r["audio"] for r in data["test"]]
        audio_s = sum(len(c) for r in data.values() for c in (x["audio"] for x in r)) / 16000
        tokenizer = Tokenizer.from_folder(folder)
        model = load_model(folder, task="seq2seq")

        def evaluate() -> tuple[dict[str, float], list[str]]:
            # at most 96 new tokens: the longest sentence is 40 words, and a looping decoder stops there
            heard = Transcriber(model, folder, tokenizer, max_new_tokens=96)(test_clips)
            return compute_metrics("speech", heard, test_texts), heard

        start = time.perf_counter()
        before, heard_before = evaluate()
        print(f"before: {before}")
        model = apply_strategy(
            model,
            "lora",
            {"r": 16, "alpha": 32, "pattern": r"decoder\.layers\.\d+\.(attn|cross_attn)\.(q|v)"},
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        records = data["train"]
        batches = []
        with torch.no_grad():  # the frozen encoder's outputs, once per clip
            for i in range(0, len(records), args.batch_size):
                batch = collate_speech(model.config, records[i : i + args.batch_size], tokenizer)
                batch["encoder_outputs"] = model.body.encode(input_features=batch.pop("input_features"))
                batches.append(batch)
        model.train()
        for epoch in range(args.epochs):
            total = 0.0
            for batch in random.Random(epoch).sample(batches, len(batches)):
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                total += float(loss.detach())
            print(f"epoch {epoch + 1}: mean loss {total / len(batches):.4f}")
        model.eval()
        after, heard_after = evaluate()
        print(f"after:  {after}")
        seconds = time.perf_counter() - start
    for ref, a, b in list(zip(test_texts, heard_before, heard_after, strict=True))[:5]:
        print(f"  reference: {ref}\n  before:    {a}\n  after:     {b}")
    print(
        f"WER on {len(test_texts)} held-out clips: {before['wer']:.3f} -> {after['wer']:.3f} as written, "
        f"{before['wer_normalized']:.3f} -> {after['wer_normalized']:.3f} normalized"
    )
    emit({
        "bench": "speech_domain", "train": len(train_texts), "test": len(test_texts), "epochs": args.epochs,
        "audio_s": audio_s, "oov_tokens": oov_tokens, "oov_types": oov_types,
        **{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()},
        "seconds": seconds,
    })  # fmt: skip


if __name__ == "__main__":
    main()
