"""Full fine-tuning, partial freezing, frozen features and BitFit (chapters 4, 5)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn import TransformerOutput
from graft.strategies.base import Strategy, register
from graft.tasks.base import BODY_INPUTS, TaskModel, TaskOutput, body_of, stacks


@register
@dataclass
class Full(Strategy):
    """Every parameter trains."""

    name = "full"
    towers = True

    def prepare(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@register
@dataclass
class Freeze(Strategy):
    """The embeddings and the bottom ``layers`` blocks are frozen; the blocks above them train.

    ``layers`` counts distinct blocks (ALBERT shares one block across several depths).
    A negative value counts from the top: ``freeze:-2`` trains only the top two blocks.
    ``tower`` (a dual encoder, CLIP): that whole tower is frozen (``freeze:tower=text``, as LiT
    locks a pretrained tower); the other tower, both projections and the temperature train.
    """

    name = "freeze"
    positional = "layers"
    towers = True

    layers: int = 0
    embeddings: bool = True
    tower: str = ""

    def prepare(self, model: nn.Module) -> nn.Module:
        body = body_of(model)
        towers = getattr(body, "towers", None)
        if towers or self.tower:
            if self.tower not in (towers or {}) or self.layers:
                raise GraftError(
                    f"strategy 'freeze': option 'tower' names the tower of a dual encoder to freeze whole: "
                    f"{' or '.join(f'tower={t}' for t in towers) if towers else 'this model has none'}"
                )
            for name, p in body.named_parameters():
                p.requires_grad_(not name.startswith(self.tower + "."))
            return model
        for _, stack in stacks(body):  # an encoder-decoder: in each of its stacks
            frozen = set(range(len(stack.layers))[: self.layers])
            for name, p in stack.named_parameters():
                parts = name.split(".")
                if parts[0] == "embed":
                    p.requires_grad_(not self.embeddings)
                elif parts[0] == "layers":
                    p.requires_grad_(int(parts[1]) not in frozen)
                else:  # final norm, pooler
                    p.requires_grad_(True)
        return model


@register
@dataclass
class BitFit(Strategy):
    """Only the bias terms of the body train (Ben Zaken et al., 2021), and the head."""

    name = "bitfit"
    towers = True

    def prepare(self, model: nn.Module) -> nn.Module:
        body = body_of(model)
        if not any(name.endswith("bias") for name, _ in body.named_parameters()):
            raise GraftError(f"strategy 'bitfit': a {body.config.family} model has no biases to train")
        for name, p in body.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        return model


@register
@dataclass
class Features(Strategy):
    """Feature extraction: the body is frozen and runs once per distinct input; only the head trains.

    ``apply`` returns a ``CachedFeatures`` model sharing the body and head: the first epoch
    computes the body's outputs (in eval mode, without gradients) and keeps them, later
    epochs read them back, so many epochs of head training cost about one forward pass.
    ``dtype`` stores the features in float16/bfloat16 to halve their memory.
    """

    name = "features"
    encoder_decoders = False

    dtype: str = "float32"

    def check(self) -> None:
        super().check()
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise GraftError(
                f"strategy 'features': option 'dtype' must be float32, float16 or bfloat16, got {self.dtype!r}"
            )

    def prepare(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, TaskModel):
            raise GraftError(
                "strategy 'features' needs a task model (body + head): there is nothing to train otherwise"
            )
        return CachedFeatures(model.body, model.head, getattr(torch, self.dtype))


class CachedFeatures(TaskModel):
    """A TaskModel whose frozen body's outputs are cached per example.

    An example is keyed by its real tokens (and segment ids). Only positions where
    attention_mask is 1 are stored; padding positions come back as zeros, which heads
    never read (they pool or pick over real tokens). The state dict is the TaskModel's.
    """

    def __init__(self, body, head, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(body, head)
        self.dtype = dtype
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.body_calls = 0  # forward passes of the body (tests and reports read it)

    def train(self, mode: bool = True) -> CachedFeatures:
        super().train(mode)
        self.body.eval()  # features are computed without dropout, once
        return self

    def keys(self, batch: dict[str, Any], mask: torch.Tensor) -> list[bytes]:
        if batch.get("input_ids") is None:  # images: keyed by a digest of their pixels
            pixels = batch["pixel_values"].cpu()
            return [hashlib.blake2b(pixels[row].numpy().tobytes()).digest() for row in range(pixels.shape[0])]
        ids, types = batch["input_ids"], batch.get("token_type_ids")
        keys = []
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            key = ids[row][keep].cpu().numpy().tobytes()
            if types is not None:
                key += b"|" + types[row][keep].cpu().numpy().tobytes()
            keys.append(key)
        return keys

    def features(self, batch: dict[str, Any]) -> TransformerOutput:
        ids = batch.get("input_ids")  # (B, T)
        if ids is None:  # images: every position of the (B, T) sequence is real
            pixels = batch["pixel_values"]
            ids = torch.zeros(self.body.embed.sequence_shape(pixels), dtype=torch.long, device=pixels.device)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        keys = self.keys(batch, mask)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            self.body_calls += 1
            with torch.no_grad():
                rows = torch.tensor(missing, device=ids.device)
                sub = {
                    k: batch[k].index_select(0, rows) for k in BODY_INPUTS if torch.is_tensor(batch.get(k))
                }
                out = self.body(**sub)
            for j, i in enumerate(missing):
                keep = mask[i].bool()
                hidden = out.last_hidden_state[j][keep].to(self.dtype)  # (n_real, H)
                pooled = out.pooled[j].to(self.dtype) if out.pooled is not None else None
                self.cache[keys[i]] = (hidden, pooled)
        dtype = next(self.head.parameters(), torch.empty(0)).dtype
        hidden = torch.zeros(*ids.shape, self.config.hidden_size, dtype=dtype, device=ids.device)  # (B, T, H)
        pooled = []
        for i, key in enumerate(keys):
            h, p = self.cache[key]
            hidden[i][mask[i].bool()] = h.to(dtype)
            pooled.append(p)
        pooled_t = torch.stack(pooled).to(dtype) if pooled[0] is not None else None
        return TransformerOutput(hidden, pooled_t)

    def forward(self, **batch: Any) -> TaskOutput:
        out = self.features(batch)
        logits = self.head(out, batch)
        labels = batch.get("labels")
        loss = self.head.loss(logits, labels, batch) if labels is not None else None
        return TaskOutput(logits, loss, out)
