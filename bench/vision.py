"""CLIP image and text embedding throughput in fp32: graft vs transformers' CLIPModel.

One CLIP of ViT-B/32's shape (text: 12 layers of 512; image: 12 layers of 768 over 224 x 224
images in 32 x 32 patches; random weights, the same in both libraries: no checkpoint is needed
for the arithmetic) embeds Fashion-MNIST test images (upscaled by CLIP's preprocessing, done once
before timing) and the book's questions and answers (WordPiece ids of all-MiniLM-L6-v2's
tokenizer, cut at 76 tokens and closed by CLIP's end-of-text id). The libraries take turns; the
model calls are timed, not the preprocessing. Prints images/s and texts/s, the ratios and the
largest difference of the embeddings; ends with one JSON line.

    python bench/vision.py [--images N] [--texts N] [--repeats R] [--small]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import book_questions_and_answers, emit, fail, minilm_folder, timed

BATCH = 32
FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to embed")
    parser.add_argument("--texts", type=int, default=400, help="texts to embed (the book's 400, repeated)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per system")
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
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        fail(f"{FASHION}: Fashion-MNIST not found (apt-get install dataset-fashion-mnist)")
    if args.small:
        args.images, args.texts, args.repeats = min(args.images, 64), min(args.texts, 64), 1

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

    figures: dict = {"images": args.images, "texts": args.texts, "small": args.small}
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
