"""Experiment 2 (LiT-style): a pretrained text tower transferred into CLIP.

The text tower is all-MiniLM-L6-v2, frozen (locked, as in LiT: "Locked-image Tuning" locks the
pretrained side; here the pretrained side is the text), read by mean pooling; the image tower is a
small ViT trained from scratch, contrastively (graft's image-text head: symmetric InfoNCE with a
learned temperature), on Fashion-MNIST training images captioned from templates ("a photo of a
sneaker.", five phrasings). With --text frozen the text tower never changes, so each caption's
pooled vector is computed once; with --text lora the text tower gets LoRA on its attention
(queries and values, r=8: the tower's own weights stay frozen, as LiT's lock, but its output
adapts) and all 50 training captions go through it at every step (the batch's captions are
among them). Reported on the test split, with three templates never used in training:
zero-shot accuracy (prompt ensembling, graft.tasks.zeroshot) and text-to-image retrieval
recall@1/@5 (a hit: an image of the caption's class). Ends with one JSON line.

    python -m bench.lit [--text frozen|lora] [--train N] [--test N] [--epochs E] [--seed S] [--small]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bench.common import FASHION, FASHION_CLASSES, emit, fail, minilm_folder, require_fashion_mnist

CLASSES = FASHION_CLASSES
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {} on a plain background.",
    "a black and white photo of a {}.",
]
TEST_TEMPLATES = ["a grayscale product shot of a {}.", "this is a {}.", "a low resolution picture of the {}."]


def pixels(images) -> torch.Tensor:
    """(N, 1, 28, 28) in [-1, 1] from uint8 Fashion-MNIST images (mean and std 0.5, as ViT's)."""
    return (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255 - 0.5) / 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20000, help="training images (of 60,000)")
    parser.add_argument("--test", type=int, default=2000, help="test images (of 10,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text", choices=("frozen", "lora"), default="frozen", help="the text tower: locked, or LoRA"
    )
    parser.add_argument("--small", action="store_true", help="a few steps: check the script runs")
    args = parser.parse_args()
    try:
        from graft import kernels
        from graft.data.folders import read_idx
        from graft.loading import load_model
        from graft.nn import DualEncoder, DualEncoderConfig, DualEncoderOutput, TransformerConfig
        from graft.strategies import apply_strategy, count_parameters
        from graft.tasks import TaskModel
        from graft.tasks.image_text import ImageTextHead, retrieval_metrics
        from graft.tasks.zeroshot import classify, label_embeddings
        from graft.tokenizer import Tokenizer
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")
    require_fashion_mnist()
    if args.small:
        args.train, args.test, args.epochs = 512, 256, 1

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    text = load_model(minilm_folder(), task="base", kernels=False)
    tokenizer = Tokenizer.from_folder(minilm_folder())
    vision = TransformerConfig(
        family="vit", vocab_size=0, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
        max_positions=17, inputs="patches", image_size=28, patch_size=7, num_channels=1, prenorm=True,
        final_norm=True, norm_eps=1e-6, tie_word_embeddings=False, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    cfg = DualEncoderConfig(
        family="clip", text=text.config, vision=vision, projection_dim=128, text_pooling="mean"
    )
    body = DualEncoder(cfg)
    body.text = text  # the pretrained tower, in place of the random one
    if args.text == "frozen":
        model = apply_strategy(TaskModel(body, ImageTextHead(body)), "freeze:tower=text")
    else:  # LoRA on the text tower alone (its own weights frozen); the rest of the CLIP trains whole
        body.text = apply_strategy(text, "lora:r=8,alpha=16,targets=q+v")
        model = TaskModel(body, ImageTextHead(body))
    kernels.optimize(model)
    n_trainable = count_parameters(model).trainable

    def pooled(texts: list[str]) -> torch.Tensor:  # (N, 384) the text tower's mean-pooled vectors
        enc = tokenizer.encode(texts, max_length=64)
        with torch.inference_mode():
            return body.pool_text(enc.input_ids, enc.attention_mask).clone()

    captions = [t.format(c) for c in CLASSES for t in TRAIN_TEMPLATES]  # class-major
    caption_ids = tokenizer.encode(captions, max_length=64)
    caption_vectors = pooled(captions)  # (10 * 5, 384), once: computed again each step under LoRA
    train_images = read_idx(FASHION / "train-images-idx3-ubyte.gz")[: args.train]
    train_labels = torch.from_numpy(
        read_idx(FASHION / "train-labels-idx1-ubyte.gz")[: args.train].astype("int64")
    )
    test_images = pixels(read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[: args.test])
    test_labels = torch.from_numpy(
        read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")[: args.test].astype("int64")
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(train_labels) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.1)
    start, step = time.perf_counter(), 0
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_labels))
        for i in range(0, len(order), args.batch_size):
            rows = order[i : i + args.batch_size]
            x = pixels(train_images[rows.numpy()])  # (B, 1, 28, 28)
            which = torch.tensor(
                [
                    int(c) * len(TRAIN_TEMPLATES) + rng.randrange(len(TRAIN_TEMPLATES))
                    for c in train_labels[rows]
                ]
            )
            if args.text == "lora":  # (50, 384), with gradients into the text tower's LoRA weights
                caption_vectors = body.pool_text(caption_ids.input_ids, caption_ids.attention_mask)
            out = DualEncoderOutput(
                body.text_projection(caption_vectors[which]), body.encode_image(x), body.logit_scale
            )
            loss = model.head.loss(model.head(out, {}), torch.arange(len(rows)), {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                body.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of at most 100
            step += 1
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f} ({step} steps, {time.perf_counter() - start:.0f} s)"
        )
    seconds = time.perf_counter() - start

    model.eval()
    with torch.inference_mode():
        images = torch.cat(
            [body.encode_image(test_images[i : i + 512]) for i in range(0, len(test_images), 512)]
        )

        def encode(texts: list[str]) -> torch.Tensor:
            return body.text_projection(pooled(texts))

        figures = {"text": args.text, "trainable": n_trainable, "train_images": len(train_labels), "test_images": len(test_labels), "epochs": args.epochs,
                   "seed": args.seed, "train_seconds": round(seconds, 1)}  # fmt: skip
        for name, templates in (
            ("unseen_templates", TEST_TEMPLATES),
            ("training_templates", TRAIN_TEMPLATES),
        ):
            logits = classify(images, label_embeddings(encode, CLASSES, templates))  # (N, 10)
            figures[f"zero_shot_accuracy_{name}"] = round(
                float((logits.argmax(1) == test_labels).float().mean()), 4
            )
        # text-to-image retrieval: each test image's caption, from an unseen template, finds images
        queries = [rng.choice(TEST_TEMPLATES).format(CLASSES[int(c)]) for c in test_labels]
        metrics = retrieval_metrics(images, encode(queries), [CLASSES[int(c)] for c in test_labels])
        figures.update({k: round(v, 4) for k, v in metrics.items() if k.startswith("text_to_image")})
    print(
        f"text tower {args.text}: zero-shot accuracy, unseen templates {figures['zero_shot_accuracy_unseen_templates']:.3f}"
        f" (training templates {figures['zero_shot_accuracy_training_templates']:.3f}) | text-to-image recall@1"
        f" {figures['text_to_image_recall_at_1']:.3f}, @5 {figures['text_to_image_recall_at_5']:.3f}"
    )
    emit(figures)


if __name__ == "__main__":
    main()
