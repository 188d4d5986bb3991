"""What ``graft pretrain`` trains: a model, the batches of a stream, the loss of a batch, the folder out.

Every objective owns the generators its batches draw from (masks, spans, samples), so that a
checkpoint can save their states and a resumed run draw exactly what the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.data.packing import chunks_at, packable
from graft.data.spans import corrupt_spans, input_and_target_lengths, span_lengths
from graft.errors import GraftError
from graft.loading import load_config, load_model, save_model
from graft.models import FAMILIES
from graft.pretrain.electra import Electra, load_electra
from graft.pretrain.stream import Batches, Position, clm_batches, mlm_batches, tokens
from graft.tasks.seq2seq import shift_right
from graft.train.config import Recipe

GENERATOR = "generator"  # ELECTRA's generator folder, inside the discriminator's
TASKS = {"mlm": "masked-lm", "clm": "causal-lm", "span-corruption": "seq2seq", "electra": "masked-lm"}


class Objective:
    """A model to train on a stream of text: ``batches(texts, start)``, ``loss(batch)``, ``save(folder)``."""

    model: nn.Module

    def generators(self) -> dict[str, torch.Generator]:
        """The generators batches and losses draw from, by name (their states go in checkpoints)."""
        return {}

    def batches(self, texts: Iterator[str], start: Position) -> Batches:
        raise NotImplementedError

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The batch's loss and the number of tokens in it."""
        out = self.model(**batch)
        return out.loss, self.model.head.count(batch["labels"], batch)

    def save(self, folder: Path, tokenizer: Any) -> None:
        save_model(self.model, folder, tokenizer)


class LanguageModel(Objective):
    """Masked LM (dynamic masks from the head's generator) or causal LM (packed or padded rows)."""

    def __init__(self, model: nn.Module, tokenizer: Any, recipe: Recipe) -> None:
        self.model, self.tokenizer, self.recipe = model, tokenizer, recipe

    def generators(self) -> dict[str, torch.Generator]:
        return {"masking": self.model.head.generator} if self.model.task == "masked-lm" else {}

    def batches(self, texts: Iterator[str], start: Position) -> Batches:
        t, pack = self.recipe.train, self.recipe.pretrain.pack
        size, width = t.batch_size, self.recipe.data.max_length
        if self.model.task == "masked-lm":
            return mlm_batches(texts, self.model.head, self.tokenizer, size, width, pack, start)
        return clm_batches(texts, self.model.config, self.tokenizer, size, width, pack, start)


class SpanCorruption(Objective):
    """T5's objective: rows of concatenated documents, spans dropped and named by sentinels, the
    encoder reads what is left and the decoder writes the spans (graft.data.spans)."""

    def __init__(self, model: nn.Module, tokenizer: Any, recipe: Recipe) -> None:
        p = recipe.pretrain
        self.model, self.tokenizer, self.recipe = model, tokenizer, recipe
        self.density, self.span = p.noise_density, p.mean_span_length
        # each row is this long before corruption, so that its input is data.max_length tokens
        self.length, targets = input_and_target_lengths(recipe.data.max_length, self.density, self.span)
        if tokenizer.eos_token_id is None:
            raise GraftError(
                "span-corruption: the tokenizer has no eos token (eos_token in tokenizer_config.json)"
            )
        self.last = len(tokenizer) - 1
        spans = span_lengths(self.density, self.span, self.length)[1]
        wanted = [f"<extra_id_{k}>" for k in range(max(spans, 1))]
        found = tokenizer.convert_ids_to_tokens(list(range(self.last, self.last - len(wanted), -1)))
        if found != wanted:
            raise GraftError(
                f"span-corruption: the tokenizer's last {len(wanted)} ids must be T5's sentinels"
                f" <extra_id_0>, <extra_id_1>... (rows of {self.length} tokens hide up to {len(wanted)} spans);"
                f" found {found[0]!r} at id {self.last}"
            )
        self.generator = torch.Generator().manual_seed(recipe.train.seed)

    def generators(self) -> dict[str, torch.Generator]:
        return {"spans": self.generator}

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(rows, dtype=torch.long)  # (B, L)
        eos, pad = self.tokenizer.eos_token_id, self.model.config.pad_token_id or 0
        inputs, labels = corrupt_spans(ids, self.last, eos, self.generator, self.density, self.span)
        return {
            "input_ids": inputs,  # (B, max_length)
            "attention_mask": torch.ones_like(inputs),
            "labels": labels,  # (B, targets)
            "decoder_input_ids": shift_right(labels, self.model.head.start_token(), pad),
        }

    def batches(self, texts: Iterator[str], start: Position) -> Batches:
        # the tokenizer's own eos closes each document (T5's appends </s>), as run_t5_mlm_flax has it
        rows = chunks_at(tokens(texts, self.tokenizer, start, eos=False), self.length, start)
        return Batches(rows, self.recipe.train.batch_size, self.collate, start)


class ElectraObjective(Objective):
    """ELECTRA (graft.pretrain.electra): the generator's masked batches, the summed loss; the
    discriminator saved as the model, the generator in generator/."""

    def __init__(self, model: Electra, tokenizer: Any, recipe: Recipe) -> None:
        self.model, self.tokenizer, self.recipe = model, tokenizer, recipe

    def generators(self) -> dict[str, torch.Generator]:
        return {"masking": self.model.generator.head.generator, "sampling": self.model.sampler}

    def batches(self, texts: Iterator[str], start: Position) -> Batches:
        t, pack = self.recipe.train, self.recipe.pretrain.pack
        size, width = t.batch_size, self.recipe.data.max_length
        return mlm_batches(texts, self.model.generator.head, self.tokenizer, size, width, pack, start)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self.model(**batch)

    def save(self, folder: Path, tokenizer: Any) -> None:
        save_model(self.model.discriminator, folder, tokenizer)
        save_model(self.model.generator, folder / GENERATOR, tokenizer)


def check_objective(path: Path, objective: str, source: str) -> None:
    """The objective fits the model's family (checked from config.json, before the weights load)."""
    family, cfg = load_config(path)
    task = TASKS[objective]
    if task == "masked-lm" and task not in family.architectures:
        with_mlm = ", ".join(sorted(n for n, f in FAMILIES.items() if task in f.architectures))
        after = "span-corruption" if family.encoder_decoder else "clm"
        raise GraftError(
            f"{source}: pretrain.objective: {objective} needs a masked-LM family ({with_mlm});"
            f" a {family.name} model trains with {after}"
        )
    if task == "causal-lm" and (family.encoder_decoder or not cfg.causal):
        after = "span-corruption" if family.encoder_decoder else "mlm"
        raise GraftError(
            f"{source}: pretrain.objective: clm needs a decoder; a {family.name} model trains with {after}"
        )
    if task == "seq2seq" and not family.encoder_decoder:
        after = "clm" if cfg.causal else "mlm"  # an encoder-only or decoder-only family
        raise GraftError(
            f"{source}: pretrain.objective: span-corruption needs an encoder-decoder (T5);"
            f" a {family.name} model trains with {after}"
        )


def check_packable(body: nn.Module, source: str) -> None:
    """Packed masked-LM rows need each document's output to be what it is alone (graft.data.packing)."""
    if not packable(body):
        raise GraftError(
            f"{source}: pretrain.pack: a {body.config.family} model's attention would mix the documents"
            " packed in a row (relative positions, a sliding window or virtual tokens); set pretrain.pack=false"
        )


def build_objective(path: Path, recipe: Recipe, tokenizer: Any, source: str) -> Objective:
    """The objective of ``recipe.pretrain.objective`` around the model at ``path``, loaded to train."""
    p, t = recipe.pretrain, recipe.train
    check_objective(path, p.objective, source)
    if p.objective == "electra":
        electra = load_electra(path, recipe)
        if p.pack:
            check_packable(electra.discriminator.body, source)
        return ElectraObjective(electra, tokenizer, recipe)
    options: dict[str, Any] = {}
    if TASKS[p.objective] == "masked-lm":
        options = {"mask_probability": p.mask_probability, "whole_word": p.whole_word, "seed": t.seed}
    model = load_model(
        path,
        task=TASKS[p.objective],
        dtype=getattr(torch, recipe.model.dtype),
        kernels=recipe.model.kernels,
        to_train=True,
        **options,
    )
    if p.objective == "span-corruption":
        return SpanCorruption(model, tokenizer, recipe)
    if p.pack and model.task == "masked-lm":
        check_packable(model.body, source)
    return LanguageModel(model, tokenizer, recipe)
