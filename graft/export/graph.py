"""What an exported file computes: a model as a function of named tensors (chapter 8).

``TaskGraph`` wraps a body or a task model: (input_ids, attention_mask[, token_type_ids]) in,
one named output out (``last_hidden_state``, ``logits`` or ``embedding``). ``DecoderGraph``
wraps a causal LM with its KV cache as plain tensors (the layout in graft/export/__init__.py).

Both build the attention mask themselves as the 4-D boolean tensor ``Transformer.forward`` uses
as given, so the traced graph holds no branch on the mask's values (the eager model skips the
mask when no row is padded: a tracer would keep whichever branch its example took).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.nn import KVCache, Transformer
from graft.nn.attention import build_mask
from graft.tasks import TaskModel
from graft.tasks.base import body_inputs, body_of

# the task -> the name of the graph's output (a bare body gives its hidden states)
OUTPUTS = {
    "base": "last_hidden_state",
    "classification": "logits",
    "token-classification": "logits",
    "question-answering": "logits",
    "embedding": "sentence_embedding",  # "embedding" is taken: the exporter names the lookup so
    "causal-lm": "logits",
    "image-classification": "logits",
}
PER_TOKEN = {"base", "token-classification", "question-answering", "causal-lm"}  # outputs (B, T, ...)


@dataclass(frozen=True)
class Tensor:
    """One input or output of an exported graph: its name, dtype and shape (axis names or sizes)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def task_of(model: nn.Module) -> str:
    return model.task if isinstance(model, TaskModel) else "base"


def attention_mask_4d(
    attention_mask: torch.Tensor, q_len: int, causal: bool, window: int | None
) -> torch.Tensor:
    """(B, S) 1 = real token -> the (B, 1, T|1, S) bool mask Transformer.forward uses as given."""
    if not causal:
        return attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
    return build_mask(attention_mask, q_len, attention_mask.shape[1], True, window)  # (B, 1, T, S)


class TaskGraph(nn.Module):
    """A body or task model as (input_ids, attention_mask[, token_type_ids]) -> one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = task_of(model)
        self.config = body_of(model).config
        self.segments = bool(self.config.type_vocab_size)  # BERT, ALBERT: token_type_ids is an input

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.segments else [])

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T), 1 = real token
        token_type_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:
        cfg = self.config
        mask = attention_mask_4d(attention_mask, input_ids.shape[1], cfg.causal, cfg.sliding_window)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if isinstance(self.model, Transformer):
            return self.model(input_ids, mask, token_type_ids).last_hidden_state  # (B, T, H)
        head = self.model.head
        out = self.model.body(**{**body_inputs(head, batch), "attention_mask": mask})
        return head(out, batch)  # (B, L), (B, T, L), (B, T, 2) or (B, H)


class ImageGraph(TaskGraph):
    """An image body or classifier as pixel_values (B, C, H, W) -> one tensor. The image size is the
    config's (positions are learned per patch), so only the batch axis is dynamic."""

    def input_names(self) -> list[str]:
        return ["pixel_values"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if isinstance(self.model, Transformer):
            return self.model(pixel_values=pixel_values).last_hidden_state  # (B, T, H)
        return self.model(pixel_values=pixel_values).logits  # (B, L) or (B, H)


class GraphCache(KVCache):
    """The past keys and values as given tensors; each layer's update returns past + new (concatenated)
    and keeps it as the ``present`` output. No preallocated buffers: a graph has no state between calls."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(len(past))
        self.past = past  # (B, nkv, P, hd) each
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]

    @property
    def length(self) -> int:
        return self.past[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, P + T, hd)
        self.present[layer] = (k, v)
        return k, v


class DecoderGraph(nn.Module):
    """A causal LM as one graph for the prompt and every step (past of length 0 for the prompt):
    (input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), past_key_values.{i}.key/value
    (B, nkv, P, hd)) -> (logits (B, T, V), present.{i}.key/value (B, nkv, P + T, hd))."""

    def __init__(self, model: TaskModel) -> None:
        super().__init__()
        self.model = model
        self.task = "causal-lm"
        self.config = model.config
        self.layers = self.config.num_blocks

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        return names + [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, P + T)
        position_ids: torch.Tensor,  # (B, T)
        *past: torch.Tensor,  # 2 * layers tensors (B, nkv, P, hd): key, value of layer 0, then 1...
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        cache = GraphCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        mask = attention_mask_4d(
            attention_mask, input_ids.shape[1], True, cfg.sliding_window
        )  # (B, 1, T, P + T)
        out = self.model.body(input_ids, mask, position_ids=position_ids, cache=cache)
        logits = self.model.head(out, {})  # (B, T, V)
        return (logits, *[t for kv in cache.present for t in kv])


def graph_for(model: nn.Module) -> TaskGraph | DecoderGraph:
    if task_of(model) == "causal-lm":
        return DecoderGraph(model)
    return ImageGraph(model) if body_of(model).config.inputs == "patches" else TaskGraph(model)


def example_inputs(
    graph: TaskGraph | DecoderGraph, batch: int, length: int, past: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs of the graph: ``batch`` rows of ``length`` tokens, the later rows padded (right
    for encoders, left for decoders as generation pads), ids in the vocabulary past the special ones."""
    cfg = graph.config
    g = torch.Generator().manual_seed(seed)
    if isinstance(graph, ImageGraph):  # images of the config's size; ``length`` does not apply
        shape = (batch, cfg.num_channels, cfg.image_size, cfg.image_size)
        return {"pixel_values": torch.randn(shape, generator=g)}  # (B, C, H, W)
    low = min(4, cfg.vocab_size - 1)
    ids = torch.randint(low, cfg.vocab_size, (batch, length), generator=g)  # (B, T)
    mask = torch.ones(batch, past + length, dtype=torch.long)  # (B, P + T)
    for row in range(1, batch):  # row 1 keeps half its tokens, row 2 a quarter...
        real = max(1, length // (row + 1))
        if cfg.causal:
            mask[row, : past + length - real] = 0
        else:
            mask[row, real:] = 0
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = ids.masked_fill(mask[:, past:] == 0, pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if isinstance(graph, DecoderGraph):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        dtype = next(graph.parameters()).dtype
        shape = (batch, cfg.num_kv_heads, past, cfg.head_dim)
        for i in range(graph.layers):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{i}.{kv}"] = torch.randn(shape, generator=g).to(dtype)
    elif graph.segments:
        inputs["token_type_ids"] = torch.zeros_like(ids)
        inputs["token_type_ids"][:, length // 2 :] = 1  # a second segment, as a text pair has
    return inputs
