"""ViT fine-tuning and CLIP embedding throughput in fp32: graft vs transformers.

ViT fine-tuning (--part vit): one randomly initialized ViTForImageClassification (saved once, so
both libraries start from the same weights) is fine-tuned on Fashion-MNIST training images (28 x 28
grayscale, upscaled to the model's 32 x 32 RGB by the checkpoint's preprocessing, done once before
timing: both libraries train on the same pixel tensors, both seeded 0) by graft's
Trainer and by transformers' Trainer, with the same optimizer (AdamW, weight decay 0.01, gradient
clipping at 1.0), linear schedule with warm-up, batch size and epochs. The libraries take turns
(--repeats); the figure is each trainer's own training examples/s (best of the turns), and the
test accuracy of each trained model on Fashion-MNIST test images. Goal: >= 1.3x at the same accuracy.

CLIP embedding (--part clip):
One CLIP of ViT-B/32's shape (text: 12 layers of 512; image: 12 layers of 768 over 224 x 224
images in 32 x 32 patches; random weights, the same in both libraries: no checkpoint is needed
for the arithmetic) embeds Fashion-MNIST test images (upscaled by CLIP's preprocessing, done once
before timing) and the book's questions and answers (WordPiece ids of all-MiniLM-L6-v2's
tokenizer, cut at 76 tokens and closed by CLIP's end-of-text id). The libraries take turns; the
model calls are timed, not the preprocessing. Prints images/s and texts/s, the ratios and the
largest difference of the embeddings; ends with one JSON line.

    python -m bench.vision [--part vit|clip|all] [--train N] [--test N] [--epochs E]
        [--images N] [--texts N] [--repeats R] [--small]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from bench.common import (
    FASHION,
    FASHION_CLASSES,
    book_questions_and_answers,
    emit,
    fail,
    minilm_folder,
    require_fashion_mnist,
    timed,
)

BATCH = 32
EOS = 49407  # CLIP's <|endoftext|>, also its padding


def clip_config(small: bool):
    import transformers

    if small:  # a quick check that the script runs
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        return transformers.CLIPConfig(text_config=text, vision_config={**vision, "image_size": 64, "patch_size": 16},
                                       projection_dim=32)  # fmt: skip
    return transformers.CLIPConfig(projection_dim=512)  # ViT-B/32's shape (the defaults)


def text_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) batches of the book's texts: WordPiece ids, then end-of-text, padded with it."""
    import transformers

    questions, answers = book_questions_and_answers()
    texts = (questions + answers) * (n // 400 + 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:76] + [EOS] for t in texts[:n]]
    batches = []
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), EOS)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
        batches.append((ids, mask))
    return batches


def image_batches(n: int, side: int) -> list[torch.Tensor]:
    """(B, 3, side, side) pixel batches of Fashion-MNIST test images, through CLIP's preprocessing."""
    from graft.data.folders import read_idx
    from graft.vision import ImageProcessor

    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n]
    processor = ImageProcessor(size=None, shortest_edge=side, resample=3, crop=(side, side),
                               mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758))  # fmt: skip
    return [processor(list(images[i : i + BATCH])) for i in range(0, len(images), BATCH)]


def vit_config(small: bool):
    import transformers

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if not small:  # ViT-Tiny's width and heads, 6 blocks, over 32 x 32 images in 4 x 4 patches (65 tokens)
        size = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
    labels = FASHION_CLASSES
    return transformers.ViTConfig(
        **size, image_size=32, patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip


def fashion(split: str, n: int, folder: Path) -> list[dict]:
    """The first ``n`` images of a Fashion-MNIST split as {"pixel_values": (3, 32, 32), "labels": id}
    rows, through the model folder's preprocessing (graft's, equal to transformers' ViT processor)."""
    from graft.data.folders import read_idx
    from graft.loading import load_config
    from graft.vision import ImageProcessor

    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:n]
    processor = ImageProcessor.for_model(folder, load_config(folder)[1])
    pixels = torch.cat([processor(list(images[i : i + 256])) for i in range(0, len(images), 256)])
    return [{"pixel_values": pixels[i], "labels": int(y)} for i, y in enumerate(labels)]


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows])}  # fmt: skip


def accuracy(model, test: list[dict], logits_of) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(test), 256):
            batch = stack(test[i : i + 256])
            correct += int((logits_of(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
    return correct / len(test)


def warmup_steps(args, n_train: int) -> int:
    """A tenth of the optimizer steps, the same count for both trainers."""
    return math.ceil(0.1 * args.epochs * math.ceil(n_train / BATCH))


def finetune_graft(args, folder: Path, train: list[dict], test: list[dict]) -> tuple[float, float]:
    """(training examples/s, test accuracy) of graft's Trainer."""
    import json

    from graft.loading import load_model
    from graft.strategies import apply_strategy
    from graft.train.config import load_recipe
    from graft.train.loop import Trainer

    torch.manual_seed(0)
    model = apply_strategy(load_model(folder, task="image-classification", to_train=True), "full")
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            base={
                "optim": {"lr": args.lr, "weight_decay": 0.01},
                "schedule": {"name": "linear", "warmup_steps": warmup_steps(args, len(train))},
                "train": {"output": out, "epochs": args.epochs, "batch_size": BATCH, "seed": 0, "device": "cpu",
                          "plots": False, "log_every": 10**6},
                "checkpoint": {"keep": 0, "save_model": False},
            }
        )  # fmt: skip
        Trainer(model, recipe, train, stack, quiet=True).fit()
        logged = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"examples_per_s"' in line]
    return logged[-1]["examples_per_s"], accuracy(model, test, lambda x: model(pixel_values=x).logits)


def finetune_transformers(args, folder: Path, train: list[dict], test: list[dict]) -> tuple[float, float]:
    """(training examples/s, test accuracy) of transformers' Trainer."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification.from_pretrained(folder)
    model.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=args.epochs, learning_rate=args.lr,
            weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=warmup_steps(args, len(train)), max_grad_norm=1.0, seed=0,
            report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=train, data_collator=stack)
        speed = trainer.train().metrics["train_samples_per_second"]
    return float(speed), accuracy(model, test, lambda x: model(pixel_values=x).logits)


def vit_rows(args, figures: dict) -> None:
    """ViT fine-tuning, the libraries in turns: examples/s and accuracy of each, and the ratio."""
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transformers.ViTForImageClassification(vit_config(args.small)).save_pretrained(folder)
        transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
        train, test = fashion("train", args.train, folder), fashion("test", args.test, folder)
        runs: dict[str, list[tuple[float, float]]] = {"graft": [], "transformers": []}
        for _ in range(args.repeats):
            runs["graft"].append(finetune_graft(args, folder, train, test))
            runs["transformers"].append(finetune_transformers(args, folder, train, test))
    for system, results in runs.items():
        figures[f"vit_finetune_{system}_per_s"] = round(max(speed for speed, _ in results), 2)
        figures[f"vit_finetune_{system}_accuracy"] = round(results[-1][1], 4)
    figures["vit_finetune_graft_vs_transformers"] = round(
        figures["vit_finetune_graft_per_s"] / figures["vit_finetune_transformers_per_s"], 3
    )
    print(
        f"ViT fine-tuning, {len(train)} images x {args.epochs:g} epochs | "
        + " | ".join(
            f"{s} {figures[f'vit_finetune_{s}_per_s']:,.1f}/s, accuracy {figures[f'vit_finetune_{s}_accuracy']:.3f}"
            for s in runs
        )
        + f" | graft/transformers {figures['vit_finetune_graft_vs_transformers']:.2f}x (goal 1.3x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to embed")
    parser.add_argument("--texts", type=int, default=400, help="texts to embed (the book's 400, repeated)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per system")
    parser.add_argument("--part", choices=("vit", "clip", "all"), default="all")
    parser.add_argument(
        "--train", type=int, default=4000, help="ViT fine-tuning: training images (of 60,000)"
    )
    parser.add_argument("--test", type=int, default=2000, help="ViT fine-tuning: test images (of 10,000)")
    parser.add_argument("--epochs", type=float, default=2, help="ViT fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="ViT fine-tuning peak learning rate")
    parser.add_argument(
        "--small", action="store_true", help="a tiny CLIP and few inputs: check the script runs"
    )
    args = parser.parse_args()
    try:
        import transformers

        from graft import kernels
        from graft.loading import load_model
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    require_fashion_mnist()
    if args.small:
        args.images, args.texts, args.repeats = min(args.images, 64), min(args.texts, 64), 1
        args.train, args.test, args.epochs = min(args.train, 128), min(args.test, 128), 1

    figures: dict = {"images": args.images, "texts": args.texts, "small": args.small}
    if args.part in ("vit", "all"):
        vit_rows(args, figures)
    if args.part == "vit":
        emit(figures)
        return

    torch.manual_seed(0)
    config = clip_config(args.small)
    hf_model = transformers.CLIPModel(config).eval()
    hf_model.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        graft_model = load_model(folder)
        reference_model = load_model(folder, kernels=False)

    texts = text_batches(args.texts)
    images = image_batches(args.images, config.vision_config.image_size)

    def run_hf(kind: str) -> torch.Tensor:
        with torch.inference_mode():
            if kind == "images":
                return torch.cat([hf_model.get_image_features(pixel_values=x).pooler_output for x in images])
            return torch.cat(
                [hf_model.get_text_features(input_ids=i, attention_mask=m).pooler_output for i, m in texts]
            )

    def run_graft(model, kind: str) -> torch.Tensor:
        with torch.inference_mode(), kernels.frozen(model):
            if kind == "images":
                return torch.cat([model.encode_image(x) for x in images])
            return torch.cat([model.encode_text(i, m) for i, m in texts])

    for kind, count in (("images", args.images), ("texts", args.texts)):
        systems = {
            "transformers": lambda k=kind: run_hf(k),
            "graft": lambda k=kind: run_graft(graft_model, k),
            "graft_reference": lambda k=kind: run_graft(reference_model, k),
        }
        for fn in systems.values():  # warm up (graft's kernels time their routes at first use)
            fn()
        results, best = {}, dict.fromkeys(systems, float("inf"))
        for _ in range(args.repeats):  # the systems take turns, so a change in load hits all
            for system, fn in systems.items():
                results[system], seconds = timed(fn)
                best[system] = min(best[system], seconds)
        for system, seconds in best.items():
            figures[f"{kind}_{system}_per_s"] = round(count / seconds, 2)
        figures[f"{kind}_graft_vs_transformers"] = round(best["transformers"] / best["graft"], 3)
        figures[f"{kind}_graft_reference_vs_transformers"] = round(
            best["transformers"] / best["graft_reference"], 3
        )
        figures[f"{kind}_max_abs_diff_vs_transformers"] = float(
            (results["graft"] - results["transformers"]).abs().max()
        )
        print(
            f"{kind:6s} {count:5d} | "
            + " | ".join(f"{s} {figures[f'{kind}_{s}_per_s']:8,.1f}/s" for s in systems)
            + f" | graft/transformers {figures[f'{kind}_graft_vs_transformers']:.2f}x"
            + f" | reference/transformers {figures[f'{kind}_graft_reference_vs_transformers']:.2f}x"
            + f" | max |graft - transformers| {figures[f'{kind}_max_abs_diff_vs_transformers']:.1e}"
        )
    emit(figures)


if __name__ == "__main__":
    main()
