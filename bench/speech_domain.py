"""Adapting whisper-base to a domain it does not know well: spoken sentences about transformers.

Sentences about the field (LoRA, softmax, GELU, RoPE, tokenizers...) are built from templates,
spoken by espeak-ng (a synthetic voice Whisper rarely heard), split by sentence into training and
held-out clips (no sentence in both), and whisper-base (faster-whisper's weights, converted by
graft) is measured on the held-out clips before and after LoRA fine-tuning on the training clips:
word error rate, as written and normalized (case and punctuation aside).

LoRA (r 16) sits on the decoder's self- and cross-attention queries and values; the encoder stays
frozen, so each clip's encoder output is computed once and reused by every epoch.

    python bench/speech_domain.py [--train 200] [--test 60] [--epochs 4] [--small]

Ends with one JSON line; exits non-zero if it could not run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common
from bench.common import emit  # noqa: E402
from bench.seq2seq_speech import speak, whisper_base  # noqa: E402

SUBJECTS = [
    "LoRA", "the softmax", "layer norm", "RMS norm", "the GELU activation", "rotary position embedding",
    "the tokenizer", "byte pair encoding", "the KV cache", "multi head attention", "the feed forward block",
    "the encoder decoder", "beam search", "perplexity", "the learning rate warmup", "gradient accumulation",
    "the AdamW optimizer", "weight decay", "the residual stream", "the attention mask", "prefix tuning",
    "the adapter layer", "knowledge distillation", "the logits", "the embedding table", "quantization",
]  # fmt: skip
VERBS = [
    "stabilizes", "speeds up", "regularizes", "rescales", "compresses", "normalizes", "reshapes",
    "projects", "caches", "masks", "decodes", "fine tunes",
]  # fmt: skip
OBJECTS = [
    "the hidden states", "the query and key vectors", "every transformer block", "the pretrained checkpoint",
    "long sequences", "the cross entropy loss", "the low rank matrices", "the vocabulary", "each token",
    "the value projections", "the decoder's self attention", "the frozen backbone",
]  # fmt: skip


def sentences(n: int, seed: int = 0) -> list[str]:
    """n distinct template sentences, shuffled."""
    all_ = [f"{s[0].upper()}{s[1:]} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    random.Random(seed).shuffle(all_)
    return all_[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--small", action="store_true", help="16 training and 8 held-out clips, 1 epoch")
    args = parser.parse_args()
    if args.small:
        args.train, args.test, args.epochs = 16, 8, 1

    from graft.generation.speech import Transcriber
    from graft.loading import load_model
    from graft.metrics import compute_metrics
    from graft.strategies import apply_strategy
    from graft.tasks.speech import collate_speech
    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    texts = sentences(args.train + args.test)
    train_texts, test_texts = texts[: args.train], texts[args.train :]
    with tempfile.TemporaryDirectory(prefix="bench-domain-") as tmp_name:
        tmp = Path(tmp_name)
        folder = whisper_base(tmp)
        train_clips, test_clips = speak(tmp, train_texts), speak(tmp, test_texts)
        tokenizer = Tokenizer.from_folder(folder)
        model = load_model(folder, task="seq2seq")

        def evaluate() -> dict[str, float]:
            heard = Transcriber(model, folder, tokenizer)(test_clips)
            return compute_metrics("speech", heard, test_texts)

        start = time.perf_counter()
        before = evaluate()
        print(f"before: {before}")
        model = apply_strategy(
            model,
            "lora",
            {"r": 16, "alpha": 32, "pattern": r"decoder\.layers\.\d+\.(attn|cross_attn)\.(q|v)"},
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        records = [{"audio": c, "text": t} for c, t in zip(train_clips, train_texts, strict=True)]
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
        after = evaluate()
        print(f"after:  {after}")
        seconds = time.perf_counter() - start
    print(
        f"WER on {len(test_texts)} held-out clips: {before['wer']:.3f} -> {after['wer']:.3f} as written, "
        f"{before['wer_normalized']:.3f} -> {after['wer_normalized']:.3f} normalized"
    )
    emit({
        "bench": "speech_domain", "train": len(train_texts), "test": len(test_texts), "epochs": args.epochs,
        **{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()},
        "seconds": seconds,
    })  # fmt: skip


if __name__ == "__main__":
    main()
