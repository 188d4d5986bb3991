"""ELECTRA's replaced-token detection (chapter 4): a small generator fills the masks, the model tells
which tokens it replaced.

The generator is a masked LM built from the model's first layers (a third of them unless
pretrain.generator_layers says), sharing the model's embeddings as ELECTRA does; it is trained
with the usual MLM loss. Its samples at the masked positions make the discriminator's input; the
discriminator (the model itself, with a one-output token-classification head) learns, at every
real token, whether it differs from the original text: a sample that happens to equal the
original is labelled original. loss = generator MLM + pretrain.disc_weight x discriminator BCE.
The discriminator is saved as the family's token-classification folder (num_labels 1, the RTD
head), the generator beside it in generator/.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graft.kernels
from graft.data.masking import IGNORE
from graft.errors import GraftError
from graft.loading import load_model
from graft.tasks import TaskModel
from graft.train.config import Recipe


def rtd_labels(fake: torch.Tensor, original: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 where the discriminator's input differs from the original text, 0 where it is
    the same, -100 on padding (out of the loss)."""
    labels = (fake != original).float()
    return labels.masked_fill(attention_mask == 0, IGNORE)


class Electra(nn.Module):
    """generator (masked LM) + discriminator (token classification, one output), embeddings shared."""

    def __init__(self, generator: TaskModel, discriminator: TaskModel, disc_weight: float, seed: int) -> None:
        super().__init__()
        generator.body.embed = discriminator.body.embed  # one table: the MLM decoder stays tied to it
        if generator.head.tied:
            generator.head.decoder.weight = discriminator.body.embed.tokens.weight
        self.generator, self.discriminator, self.disc_weight = generator, discriminator, disc_weight
        self.sampler = torch.Generator().manual_seed(seed + 1)  # the generator's samples

    def replace(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake, original) ids, (B, T) each: the masked positions sampled from the generator's logits."""
        labels = batch["labels"]
        masked = labels != IGNORE  # (B, T)
        original = torch.where(masked, labels, batch["input_ids"])
        rows = logits if logits.dim() == 2 else logits[masked]  # (M, V): training gives masked rows only
        probs = rows.detach().float().softmax(-1).cpu()  # (M, V): sampled on the CPU generator
        sampled = (
            torch.multinomial(probs, 1, generator=self.sampler)[:, 0] if len(probs) else probs.new_zeros(0)
        )
        fake = original.clone()
        fake[masked] = sampled.to(fake.device, fake.dtype)
        return fake, original

    def forward(self, **batch: Any) -> tuple[torch.Tensor, int]:
        gen = self.generator(**batch)
        fake, original = self.replace(batch, gen.logits)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self.discriminator(**{**inputs, "input_ids": fake}).logits[..., 0]  # (B, T)
        # real tokens: a packed batch's documents (its attention mask is (B, 1, T, T)), else the mask's ones
        real = batch["documents"] >= 0 if "documents" in batch else batch["attention_mask"] == 1  # (B, T)
        labels = rtd_labels(fake, original, real.long())
        real = labels != IGNORE
        disc = F.binary_cross_entropy_with_logits(logits[real].float(), labels[real])
        return gen.loss + self.disc_weight * disc, int(real.sum())


def load_electra(path: Path, recipe: Recipe) -> Electra:
    """The discriminator (the model at ``path``) and its generator, loaded to train."""
    p, t = recipe.pretrain, recipe.train
    dtype = getattr(torch, recipe.model.dtype)
    generator = load_model(
        path,
        task="masked-lm",
        dtype=dtype,
        kernels=False,
        to_train=True,
        mask_probability=p.mask_probability,
        whole_word=p.whole_word,
        seed=t.seed,
    )
    cfg = generator.body.config
    if cfg.layer_order:
        raise GraftError(
            f"electra: {cfg.family} shares its layers across depths, so it has no first layers to"
            " make a generator of; use bert, distilbert or roberta"
        )
    depth = p.generator_layers or max(1, cfg.num_layers // 3)
    if depth > cfg.num_layers:
        raise GraftError(
            f"pretrain.generator_layers: {depth}, but the model has {cfg.num_layers} layers"
            f" (e.g. pretrain.generator_layers={max(1, cfg.num_layers // 3)})"
        )
    body = generator.body
    body.layers = nn.ModuleList(list(body.layers)[:depth])
    body.layer_order = list(range(depth))
    body.config = dataclasses.replace(cfg, num_layers=depth)
    discriminator = load_model(
        path, task="token-classification", dtype=dtype, kernels=False, to_train=True, id2label=["replaced"]
    )
    model = Electra(generator, discriminator, p.disc_weight, t.seed)
    return graft.kernels.optimize(model) if recipe.model.kernels else model
