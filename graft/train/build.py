"""From a recipe to a ready Trainer: data, tokenizer, model + head, strategy, loss, metrics."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.train.config import Recipe
from graft.train.loop import Trainer, check_output

PROBLEM_TYPES = {"class": "single_label", "multi": "multi_label", "float": "regression"}
# the record key each task learns from (a data file's column, or data.columns maps one to it)
LABEL_KEYS = {"classification": "label", "token-classification": "tags", "question-answering": "answers",
              "embedding": "text_pair", "image-classification": "label", "seq2seq": "text_pair"}  # fmt: skip


def head_options(recipe: Recipe, label_map: Any) -> dict[str, Any]:
    """What the task head needs to know about the data: its labels and kind of label."""
    task = recipe.task.name
    if task in ("classification", "image-classification"):
        options = {"problem_type": PROBLEM_TYPES.get(recipe.data.label_kind, "single_label")}
        if label_map is not None:
            options["id2label"] = list(label_map.id2label)
        return options
    if task == "token-classification" and label_map is not None:
        return {"id2label": list(label_map.id2label)}
    return {}


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics dict, flattened: {"rouge": {"rouge1": .5}} -> {"rouge/rouge1": .5}."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def example_text(record: dict[str, Any]) -> str:
    text = record.get("text")
    if text is None and record.get("tokens") is not None:
        text = " ".join(record["tokens"])
    if text is None and record.get("question") is not None:
        text = f"{record['question']} {record.get('context', '')}"
    pair = record.get("text_pair")
    return f"{text or ''} {pair}" if pair else (text or "")


def token_lengths(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> list[int]:
    """Tokens per record (capped at max_length): what length grouping and the curriculum sort by."""
    lengths = []
    for start in range(0, len(records), 1024):
        texts = [example_text(records[i]) for i in range(start, min(start + 1024, len(records)))]
        enc = tokenizer.encode(texts, max_length=max_length, padding=False, return_tensors=None)
        lengths.extend(len(ids) for ids in enc.input_ids)
    return lengths


def build_trainer(
    recipe: Recipe,
    quiet: bool = False,
    callbacks=(),
    model: torch.nn.Module | None = None,
    extra_train: Sequence[dict[str, Any]] = (),
) -> Trainer:
    """The recipe's Trainer. ``model``: train this one (built by the caller: a distiller) instead of
    loading model.path, whose tokenizer and head options still apply; ``extra_train``: records
    added to the training split (a teacher's labelled transfer text)."""
    from graft.data import load_splits
    from graft.io.hf import resolve
    from graft.loading import load_model, load_processor
    from graft.tasks import HEADS
    from graft.tasks.image_text import with_augmentation
    from graft.train.losses import make_loss

    if not recipe.model.path:
        raise GraftError("model.path: no model given (a Hugging Face folder or Hub id)")
    if recipe.task.name not in HEADS:
        from graft.train.config import suggest

        raise GraftError(
            f"task.name: unknown task {recipe.task.name!r}{suggest(recipe.task.name, HEADS)} (known: {', '.join(HEADS)})"
        )
    splits = load_splits(recipe.data)
    train_set = splits["train"]
    key = LABEL_KEYS.get(recipe.task.name)
    first = train_set[0] if len(train_set) else {}
    if key == "text_pair" and "audio" in first:  # speech (graft.data.audio): the transcript is the target
        key = "text"
    if key and first and first.get(key) is None:  # before the model loads
        shown = ", ".join(k for k in first if not k.startswith("_"))
        raise GraftError(
            f"{recipe.data.train}: no {key!r} column, which training a {recipe.task.name} model needs "
            f"(read: {shown}); name yours with data.columns, e.g. data.columns={{YOUR_COLUMN: {key}}}"
        )
    label_map = train_set.label_map
    folder = resolve(recipe.model.path)
    tokenizer = load_processor(folder)  # an image model's ImageProcessor, saved with it the same way
    tokenizer = with_augmentation(tokenizer, recipe.data.augment, recipe.data.crop_scale)

    torch.manual_seed(recipe.train.seed)  # a new head starts from the same weights in every run
    dtype = getattr(torch, recipe.model.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise GraftError(f"model.dtype: {recipe.model.dtype!r} is not a torch dtype (float32, bfloat16...)")
    if model is None:
        model = load_model(
            folder,
            task=recipe.task.name,
            dtype=dtype,
            kernels=recipe.model.kernels,
            to_train=True,
            **head_options(recipe, label_map),
        )
    if recipe.strategy.name != "full" or recipe.strategy.options:
        from graft.strategies import apply_strategy

        model = apply_strategy(model, recipe.strategy.name, recipe.strategy.options)
    head = model.head

    # map-style datasets that read each record from disk when indexed (one int64 offset per row in
    # memory), so a data file larger than memory still trains; the OS page cache keeps it fast
    train = train_set if not extra_train else Joined(train_set, list(extra_train))
    validation = splits.get("validation")
    max_length = recipe.data.max_length
    t = recipe.train
    lengths = (
        token_lengths(train, tokenizer, max_length)
        if (t.group_by_length or t.curriculum_epochs) and head.inputs == "tokens"  # images: one length
        else None
    )

    loss = None
    if recipe.task.label_smoothing or recipe.task.class_weights or recipe.task.focal_gamma:
        train_labels = None
        if (
            label_map is not None
            and recipe.data.label_kind == "class"
            and recipe.task.name == "classification"
        ):
            train_labels = [label_map.label2id[str(r["label"])] for r in train]
        loss = make_loss(recipe.task, recipe.task.name, len(label_map) if label_map else None, train_labels)

    def collate(records: list[dict[str, Any]]) -> dict[str, Any]:
        return head.collate(records, tokenizer, max_length)

    def eval_step(logits: torch.Tensor, batch: dict[str, Any], records: list[dict[str, Any]]) -> Any:
        return head.postprocess(logits, batch), records

    extra_files = None
    if recipe.task.name == "seq2seq" and head.inputs == "audio_frames":  # Whisper: the loss, WER and CER
        from graft.generation.speech import Transcriber

        transcriber = Transcriber(
            model,
            folder,
            tokenizer,
            max_new_tokens=recipe.task.max_new_tokens,
            num_beams=recipe.task.num_beams,
        )

        def eval_step(logits: torch.Tensor, batch: dict[str, Any], records: list[dict[str, Any]]) -> Any:
            texts = transcriber.texts(transcriber.from_features(batch["input_features"]))
            scored = head.postprocess(logits, batch)
            return [{**p, "generated": t} for p, t in zip(scored, texts, strict=True)], records

        def extra_files(out: Path) -> None:  # what transcribing with the trained model reads
            for name in ("generation_config.json", "preprocessor_config.json"):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, out / name)

    elif recipe.task.name == "seq2seq":  # the loss, and ROUGE/BLEU/chrF of texts generated as task.* says
        from graft.generation import GenerationConfig, generate
        from graft.generation.text import decode_new

        generation = GenerationConfig.for_model(
            model, max_new_tokens=recipe.task.max_new_tokens, num_beams=recipe.task.num_beams
        )

        def eval_step(logits: torch.Tensor, batch: dict[str, Any], records: list[dict[str, Any]]) -> Any:
            out = generate(model, batch["input_ids"], batch["attention_mask"], generation)  # (B, 1 + new)
            texts = decode_new(tokenizer, out[:, 1:], generation.eos_ids)
            scored = head.postprocess(logits, batch)
            return [{**p, "generated": t} for p, t in zip(scored, texts, strict=True)], records

    def compute_metrics(collected: list[Any]) -> dict[str, float]:
        predictions = [p for preds, _ in collected for p in preds]
        records = [r for _, recs in collected for r in recs]
        return numeric(head.evaluate(predictions, records))

    trainer = Trainer(
        model, recipe, train, collate, validation,
        lengths=lengths, eval_step=eval_step, compute_metrics=compute_metrics, loss=loss,
        tokenizer=tokenizer, callbacks=callbacks, quiet=quiet, extra_files=extra_files,
    )  # fmt: skip
    trainer.test_data = splits.get("test")
    if getattr(model, "unfreezing", None) is not None:  # gradual unfreezing follows the trainer's epoch
        model.unfreezing.attach(trainer)
    return trainer


class Joined(Sequence):
    """A training split followed by more records held in memory."""

    def __init__(self, first: Sequence[Any], more: list[Any]) -> None:
        self.first, self.more = first, more

    def __len__(self) -> int:
        return len(self.first) + len(self.more)

    def __getitem__(self, i: int) -> Any:
        return self.first[i] if i < len(self.first) else self.more[i - len(self.first)]


def run_recipe(
    recipe: Recipe, resume: bool = False, quiet: bool = False, callbacks=(), overwrite: bool = False
) -> dict[str, Any]:
    """Train as the recipe says; evaluate the final model on the test split when there is one."""
    from graft.io.atomic import write_json

    check_output(Path(recipe.train.output), resume, overwrite)  # before the model and data load
    trainer = build_trainer(recipe, quiet=quiet, callbacks=callbacks)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    if trainer.test_data:
        result.update({f"test/{k}": v for k, v in trainer.evaluate(trainer.test_data).items()})
        if trainer.rank == 0:
            write_json(trainer.out / "result.json", result)
    return result
