"""``graft index``, ``graft search`` and ``graft zeroshot``: a CLIP model's shared space of images and texts.

    graft index MODEL photos/ --texts captions.txt --out INDEX/
    graft search INDEX --text "a red car" [--top-k 5]
    graft search INDEX --image query.png
    graft zeroshot MODEL --labels cat,dog --templates "a photo of a {}." photos/

(``graft embed MODEL --image ...`` prints the vectors themselves; graft/cli/models.py.) An index is
a folder written whole (atomically): index.json (the model, the images' paths, the texts) and
images.npy / texts.npy, unit-length float32 rows in that order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import ModelArg, ReferenceOpt, app, read_lines
from graft.errors import GraftError

INDEX_FILE = "index.json"
ImagesArg = Annotated[
    list[Path] | None,
    typer.Argument(help="Image files, or folders of them (read in name order).", show_default=False),
]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per batch.")]


def image_files(paths: list[Path] | None, what: str) -> list[Path]:
    """The image files named or inside the folders named (sorted), or a one-line error."""
    from graft.data.folders import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in paths or []:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise GraftError(f"{path}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise GraftError(f"{path}: file not found")
    if not files and what:
        raise GraftError(f"{what}: no images given")
    return files


def load_clip(model: str, what: str, reference: bool = False) -> tuple[Any, Any, Path]:
    """(DualEncoder, ImageTextProcessor, folder), or a one-line error when the model is not CLIP-like."""
    from graft.io.hf import resolve
    from graft.loading import load_config, load_model, load_processor

    folder = resolve(model)
    family, cfg = load_config(folder)
    if not family.dual_encoder:
        raise GraftError(
            f"{what}: {model} is a {family.name} model, which has no text and image towers (use a CLIP model)"
        )
    return load_model(folder, task="base", kernels=not reference), load_processor(folder), folder


def dual_encoder_facts(model: Any) -> dict[str, Any]:
    """``graft info`` of a dual encoder: each tower's shape, the shared space, the exact parameter count."""
    cfg = model.config
    facts: dict[str, Any] = {"family": cfg.family, "model_type": cfg.hf_config.get("model_type", cfg.family)}
    for name, tower in model.towers.items():
        t = tower.config
        facts.update(
            {
                f"{name}_layers": t.num_layers,
                f"{name}_hidden_size": t.hidden_size,
                f"{name}_heads": t.num_heads,
            }
        )
    facts.update(
        vocab_size=cfg.text.vocab_size,
        image_size=cfg.vision.image_size,
        patch_size=cfg.vision.patch_size,
        projection_dim=cfg.projection_dim,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return facts


def clip_embeddings(
    model: str, texts: list[str], images: list[Path] | None, normalize: bool, reference: bool
) -> Any:
    """``graft embed`` with a CLIP model: (N, P) float32 embeddings of the texts or the images (a
    numpy array); None for another model given texts (sentence embeddings, graft/cli/models.py)."""
    from graft.io.hf import resolve
    from graft.loading import load_config
    from graft.tasks.image_text import encode_images, encode_texts

    family, _ = load_config(resolve(model))
    if not family.dual_encoder and images is None:
        return None
    files = image_files(images, "embed") if images is not None else []
    clip, processor, _ = load_clip(model, "embed --image", reference)
    if files:
        return encode_images(clip, processor.images, [str(f) for f in files], normalize=normalize).numpy()
    return encode_texts(clip, processor.tokenizer, texts, normalize=normalize).numpy()


@app.command()
def index(
    model: ModelArg,
    images: ImagesArg = None,
    texts: Annotated[
        Path | None, typer.Option("--texts", help="A UTF-8 file of texts to index, one per line.")
    ] = None,
    out: Annotated[Path, typer.Option(help="The index folder to write (replaced whole).")] = Path("index"),
    batch_size: BatchOpt = 64,
    reference: ReferenceOpt = False,
) -> None:
    """Embed images (and texts) with a CLIP model into an index folder for ``graft search``."""
    import numpy as np

    from graft.io.atomic import atomic_folder, check_output, write_json
    from graft.io.hf import resolve
    from graft.tasks.image_text import encode_images, encode_texts

    check_output(out, "--out", folder=True)
    files = image_files(images, "" if texts else "index")
    lines = read_lines(texts) if texts is not None else []
    clip, processor, _ = load_clip(model, "index", reference)
    image_vectors = encode_images(clip, processor.images, [str(f) for f in files], batch_size)
    text_vectors = encode_texts(clip, processor.tokenizer, lines)
    with atomic_folder(out) as tmp:
        np.save(tmp / "images.npy", image_vectors.numpy())
        np.save(tmp / "texts.npy", text_vectors.numpy())
        write_json(
            tmp / INDEX_FILE,
            {
                "model": str(resolve(model).resolve()),
                "images": [str(f.resolve()) for f in files],
                "texts": lines,
            },
        )
    typer.echo(f"indexed {len(files)} images and {len(lines)} texts in {out}", err=True)


def read_index(folder: Path) -> tuple[dict[str, Any], Any, Any]:
    """(index.json, image vectors, text vectors), each checked against the others."""
    import numpy as np

    from graft.io.hf import read_json

    path = folder / INDEX_FILE
    if not path.is_file():
        raise GraftError(f"{folder}: not an index ({INDEX_FILE} not found; graft index writes one)")
    meta = read_json(path)
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), list) for k in ("images", "texts")):
        raise GraftError(f"{path}: expected the keys images and texts (lists), as graft index writes")
    arrays = []
    for name, kind in (("images.npy", "images"), ("texts.npy", "texts")):
        try:
            array = np.load(folder / name, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise GraftError(f"{folder / name}: cannot read ({e})") from None
        if array.ndim != 2 or array.shape[0] != len(meta[kind]):
            raise GraftError(
                f"{folder / name}: {array.shape[0] if array.ndim else 0} rows for {len(meta[kind])} {kind}"
                f" in {INDEX_FILE} (rebuild the index with graft index)"
            )
        arrays.append(array)
    return meta, arrays[0], arrays[1]


@app.command()
def search(
    index_folder: Annotated[Path, typer.Argument(metavar="INDEX", help="A folder written by graft index.")],
    text: Annotated[str | None, typer.Option("--text", help="Rank the index's images by this text.")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Rank the index's texts by this image.")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many results.")] = 5,
    model: Annotated[
        str | None, typer.Option(help="The model to embed the query with (default: the index's).")
    ] = None,
    reference: ReferenceOpt = False,
) -> None:
    """Rank an index's images by a text query (--text), or its texts by an image (--image): JSON lines."""
    import torch

    from graft.tasks.image_text import encode_images, encode_texts

    if (text is None) == (image is None):
        raise GraftError("search: give either --text (to rank images) or --image (to rank texts)")
    meta, images, texts = read_index(index_folder)
    if image is not None and not image.is_file():
        raise GraftError(f"{image}: file not found")
    kind, items, vectors = (
        ("images", meta["images"], images) if text is not None else ("texts", meta["texts"], texts)
    )
    if not items:
        raise GraftError(
            f"{index_folder}: the index holds no {kind} (graft index ... {'IMAGES' if kind == 'images' else '--texts FILE'})"
        )
    clip, processor, _ = load_clip(model or str(meta.get("model")), "search", reference)
    if text is not None:
        query = encode_texts(clip, processor.tokenizer, [text])  # (1, P)
    else:
        query = encode_images(clip, processor.images, [str(image)])
    if query.shape[1] != vectors.shape[1]:
        raise GraftError(
            f"{index_folder}: the index's vectors have {vectors.shape[1]} dimensions, the model's {query.shape[1]}"
            " (search with the model that built the index)"
        )
    scores = (torch.from_numpy(vectors).float() @ query[0]).tolist()  # cosine: both unit length
    order = sorted(range(len(items)), key=lambda i: -scores[i])[:top_k]
    key = "path" if kind == "images" else "text"
    for rank, i in enumerate(order, start=1):
        sys.stdout.write(
            json.dumps({"rank": rank, key: items[i], "score": scores[i]}, ensure_ascii=False) + "\n"
        )


@app.command()
def zeroshot(
    model: ModelArg,
    images: ImagesArg = None,
    labels: Annotated[str, typer.Option(help="The classes, comma-separated: cat,dog,car.")] = "",
    templates: Annotated[
        list[str] | None,
        typer.Option(
            "--templates", help='A prompt with {} for the label (repeatable; default "a photo of a {}.").'
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    reference: ReferenceOpt = False,
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="A text to classify (repeatable).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Texts to classify: CSV, JSON lines... (a text column).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="--data's format (default: from the name).")
    ] = None,
    column: Annotated[list[str] | None, typer.Option(help="YOUR_COLUMN=text (repeatable).")] = None,
    descriptions: Annotated[
        list[str] | None,
        typer.Option(
            help="Sentence encoder: LABEL=TEXT, what a label means (repeatable; default: the label)."
        ),
    ] = None,
    verbalizers: Annotated[
        list[str] | None, typer.Option(help="Causal LM: LABEL=WORDS, the label's answer (repeatable).")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help='Causal LM: the prompt, {text} for the text (default "Text: {text}\\nTopic:").'),
    ] = None,
    calibrate: Annotated[
        bool, typer.Option(help="Causal LM: contextual calibration of the label prior.")
    ] = True,
    chat: Annotated[
        bool, typer.Option("--chat", help="Causal LM: the prompt as a user message, in the chat template.")
    ] = False,
    max_length: Annotated[int | None, typer.Option(min=1, help="Texts: tokens of each text kept.")] = None,
) -> None:
    """Classify images (a CLIP model) or texts (--text/--data: a sentence encoder or a causal LM) into
    --labels with no training: JSON lines like graft predict."""
    from graft.tasks.zeroshot import DEFAULT_TEMPLATES, check_prompts, predictions, zero_shot_images

    names = [label.strip() for label in labels.split(",")] if labels.strip() else []
    if text or data is not None:
        from graft.cli.fewshot import zeroshot_texts

        if images:
            raise GraftError("zeroshot: give images or texts (--text/--data), not both")
        zeroshot_texts(model, names, text, data, fmt, column, descriptions, verbalizers, templates, prompt,
                       calibrate, chat, max_length, batch_size, reference)  # fmt: skip
        return
    prompts = templates or list(DEFAULT_TEMPLATES)
    check_prompts(names, prompts)  # before the model loads
    files = image_files(images, "zeroshot")
    clip, processor, _ = load_clip(model, "zeroshot", reference)
    logits = zero_shot_images(clip, processor, [str(f) for f in files], names, prompts, batch_size)
    for file, prediction in zip(files, predictions(logits, names), strict=True):
        sys.stdout.write(json.dumps({"image": str(file), **prediction}, ensure_ascii=False) + "\n")
