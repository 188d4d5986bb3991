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

from graft.nn import DualEncoder, EncoderDecoder, KVCache, Transformer
from graft.nn.attention import build_mask
from graft.tasks import TaskModel
from graft.tasks.base import body_inputs, body_of
from graft.tasks.pooling import mean_pool

# the task -> the name of the graph's output (a bare body gives its hidden states)
OUTPUTS = {
    "base": "last_hidden_state",
    "classification": "logits",
    "token-classification": "logits",
    "question-answering": "logits",
    "embedding": "sentence_embedding",  # "embedding" is taken: the exporter names the lookup so
    "causal-lm": "logits",
    "image-classification": "logits",
    "masked-lm": "logits",
    "seq2seq": "logits",  # the decoder graph's; its encoder graph gives encoder_hidden_states
    "image-text": "logits_per_image",  # CLIP's "logits" graph; its "text" and "image" graphs give embeddings
}
PER_TOKEN = {
    "base",
    "token-classification",
    "question-answering",
    "causal-lm",
    "masked-lm",
}  # outputs (B, T, ...)


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
    and keeps it as the ``present`` output. No preallocated buffers: a graph has no state between calls.
    ``cross``: an encoder-decoder's cross-attention keys and values, given (the encoder graph made them)."""

    def __init__(
        self,
        past: list[tuple[torch.Tensor, torch.Tensor]],
        cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__(len(past))
        self.past = past  # (B, nkv, P, hd) each
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]
        if cross is not None:  # (B, nkv, S, hd) each: read by every step, never projected again
            self.cross_keys = [k for k, _ in cross]
            self.cross_values = [v for _, v in cross]

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


def cross_names(layers: int) -> list[str]:
    return [f"cross.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class EncoderGraph(nn.Module):
    """An encoder-decoder's encoder, run once per input: (input_ids, attention_mask), or Whisper's
    input_features (B, mel bins, frames) -> (encoder_hidden_states (B, S, He), cross.{i}.key / .value
    (B, nkv, S, hd) for every decoder layer i). The keys and values every decoder step's
    cross-attention reads are projected here, once, from the (projected) encoder output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.body: EncoderDecoder = body_of(model)
        self.task = task_of(model)
        self.config = self.body.config.encoder
        self.audio = self.config.inputs == "audio_frames"
        self.layers = self.body.config.decoder.num_blocks

    def input_names(self) -> list[str]:
        return ["input_features"] if self.audio else ["input_ids", "attention_mask"]

    def output_names(self) -> list[str]:
        return ["encoder_hidden_states", *cross_names(self.layers)]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        body = self.body
        if self.audio:
            hidden = body.encode(input_features=inputs[0]).last_hidden_state  # (B, S, He)
        else:
            ids, mask = inputs  # (B, S) each
            hidden = body.encoder(ids, attention_mask_4d(mask, ids.shape[1], False, None)).last_hidden_state
        context = body.project(hidden) if body.project is not None else hidden  # (B, S, H)
        B, S = context.shape[:2]
        cross = []
        for block in body.decoder.layers:  # as Attention.forward projects them at the first step
            attn = block.cross_attn
            for proj in (attn.k, attn.v):
                cross.append(proj(context).view(B, S, attn.num_kv_heads, attn.head_dim).transpose(1, 2))
        return (hidden, *cross)


class Seq2SeqDecoderGraph(nn.Module):
    """An encoder-decoder's decoder as one graph for the start tokens and every step (an empty past
    for the first call): (decoder_input_ids (B, T), encoder_attention_mask (B, S) (not Whisper's: its
    windows have no padding), past_key_values.{i}.key/value (B, nkv, P, hd), cross.{i}.key/value
    (B, nkv, S, hd)) -> (logits (B, T, V), or a bare body's last_hidden_state (B, T, H),
    present.{i}.key/value (B, nkv, P + T, hd)). Decoder rows are not padded (as in graft's generation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.body: EncoderDecoder = body_of(model)
        self.task = task_of(model)
        self.config = self.body.config.decoder
        self.audio = self.body.config.encoder.inputs == "audio_frames"
        self.layers = self.config.num_blocks

    def input_names(self) -> list[str]:
        mask = [] if self.audio else ["encoder_attention_mask"]
        past = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        return ["decoder_input_ids", *mask, *past, *cross_names(self.layers)]

    def output_names(self) -> list[str]:
        first = "logits" if self.task == "seq2seq" else "last_hidden_state"
        return [first] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names(), inputs, strict=True))
        ids = named["decoder_input_ids"]  # (B, T)
        pairs = [
            [(named[f"{kind}.{i}.key"], named[f"{kind}.{i}.value"]) for i in range(self.layers)]
            for kind in ("past_key_values", "cross")
        ]
        cache = GraphCache(*pairs)
        T, P = ids.shape[1], cache.length
        mask = build_mask(None, T, P + T, True, device=ids.device)  # (1, 1, T, P + T)
        source = named.get("encoder_attention_mask")  # (B, S)
        context_mask = source[:, None, None, :].bool() if source is not None else None  # (B, 1, 1, S)
        # no context: every layer's cross-attention finds its keys and values in the cache
        out = self.body.decoder(ids, mask, cache=cache, context_mask=context_mask)
        first = self.model.head(out, {}) if self.task == "seq2seq" else out.last_hidden_state
        return (first, *[t for kv in cache.present for t in kv])


class TowerGraph(nn.Module):
    """One tower of a dual encoder (CLIP), projected into the shared space, not normalized (as
    graft's encode_text / encode_image): texts (input_ids, attention_mask) -> text_embeds (B, P), or
    pixel_values (B, C, H, W) -> image_embeds (B, P). The text tower gets the 4-D mask, as TaskGraph."""

    def __init__(self, model: nn.Module, tower: str) -> None:
        super().__init__()
        self.model = model
        self.body: DualEncoder = body_of(model)
        self.task = task_of(model)
        self.tower = tower
        self.config = self.body.config.text if tower == "text" else self.body.config.vision

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] if self.tower == "text" else ["pixel_values"]

    def output_names(self) -> list[str]:
        return ["text_embeds" if self.tower == "text" else "image_embeds"]

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """DualEncoder.encode_text with the mask built here (its pooling: eos token, or mean)."""
        body, cfg = self.body, self.config
        mask = attention_mask_4d(attention_mask, input_ids.shape[1], cfg.causal, cfg.sliding_window)
        if body.config.text_pooling == "mean":
            pooled = mean_pool(body.text(input_ids, mask).last_hidden_state, attention_mask)  # (B, H)
        else:
            rows = body.eos_positions(input_ids)  # (B, 1)
            pooled = body.text(input_ids, mask, rows=rows).last_hidden_state[:, 0]  # (B, H)
        return body.text_projection(pooled)  # (B, P)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.tower == "text":
            return self.embed_text(*inputs)
        return self.body.encode_image(inputs[0])  # (B, P)


class SimilarityGraph(TowerGraph):
    """CLIP's image-text logits: (pixel_values (N, C, H, W), input_ids and attention_mask (M, T)) ->
    logits_per_image (N, M), the cosine similarities times the learned temperature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "text")

    def input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    def output_names(self) -> list[str]:
        return ["logits_per_image"]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from graft.tasks.image_text import similarity

        pixel_values, input_ids, attention_mask = inputs
        images = self.body.encode_image(pixel_values)  # (N, P)
        return similarity(images, self.embed_text(input_ids, attention_mask), self.body.logit_scale)


Graph = TaskGraph | DecoderGraph | EncoderGraph | Seq2SeqDecoderGraph | TowerGraph


class Float32Interface(nn.Module):
    """A bfloat16 graph behind float32 inputs and outputs: float inputs (pixels, audio frames, past
    keys and values) are cast to bfloat16 on the way in, float outputs to float32 on the way out.
    numpy has no bfloat16, and the cast is exact both ways for what the graph itself returned (its
    presents fed back as the next step's past). Token ids and masks pass as they are."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.inner = graph  # not "graph": an exported program's module has its own .graph
        self.dtype = next(graph.parameters()).dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.inner(*(x.to(self.dtype) if x.is_floating_point() else x for x in inputs))
        if isinstance(out, tuple):
            return tuple(t.float() for t in out)
        return out.float()


def graphs_for(model: nn.Module) -> dict[str, Graph]:
    """The graphs an export writes, by name: one ("model"), an encoder-decoder's two, or a dual
    encoder's towers (and, for the image-text task, their similarity logits)."""
    body = body_of(model)
    if isinstance(body, EncoderDecoder):
        return {"encoder": EncoderGraph(model), "decoder": Seq2SeqDecoderGraph(model)}
    if isinstance(body, DualEncoder):
        towers: dict[str, Graph] = {"text": TowerGraph(model, "text"), "image": TowerGraph(model, "image")}
        return towers | ({"logits": SimilarityGraph(model)} if task_of(model) == "image-text" else {})
    return {"model": graph_for(model)}


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
    if isinstance(graph, Seq2SeqDecoderGraph):
        return seq2seq_decoder_inputs(graph, batch, length, past, length + 2, g)
    if isinstance(graph, TowerGraph):
        return tower_inputs(graph, batch, length, g)
    if isinstance(graph, EncoderGraph) and graph.audio:  # whole windows: the config's frames
        shape = (batch, cfg.num_mel_bins, 2 * cfg.max_positions)
        return {"input_features": torch.randn(shape, generator=g)}  # (B, M, F)
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
        shape = (batch, cfg.num_kv_heads, past, cfg.head_dim)
        for i in range(graph.layers):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{i}.{kv}"] = torch.randn(shape, generator=g)
    elif isinstance(graph, TaskGraph) and graph.segments:
        inputs["token_type_ids"] = torch.zeros_like(ids)
        inputs["token_type_ids"][:, length // 2 :] = 1  # a second segment, as a text pair has
    return inputs


def typed(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float inputs in ``dtype`` (a bfloat16 model's eager run); ids and masks as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def seq2seq_decoder_inputs(
    graph: Seq2SeqDecoderGraph, batch: int, length: int, past: int, source: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random decoder inputs: ``length`` new tokens after ``past`` cached ones, and the cross keys and
    values of ``source`` encoder positions (the later rows' source padded on the right)."""
    cfg = graph.config
    inputs = {
        "decoder_input_ids": torch.randint(
            min(4, cfg.vocab_size - 1), cfg.vocab_size, (batch, length), generator=g
        )
    }
    if not graph.audio:
        mask = torch.ones(batch, source, dtype=torch.long)  # (B, S)
        for row in range(1, batch):
            mask[row, max(1, source // (row + 1)) :] = 0
        inputs["encoder_attention_mask"] = mask
    for kind, n in (("past_key_values", past), ("cross", source)):
        for i in range(graph.layers):
            for kv in ("key", "value"):
                shape = (batch, cfg.num_kv_heads, n, cfg.head_dim)
                inputs[f"{kind}.{i}.{kv}"] = torch.randn(shape, generator=g)
    return inputs


def tower_inputs(graph: TowerGraph, batch: int, length: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random images (batch + 1 of them, for the similarity graph: not as many as texts) and texts of
    ``length`` tokens padded on the right as a tokenizer pads them, each ending in the end token."""
    body = graph.body
    vision, text = body.config.vision, body.config.text
    inputs = {}
    if "pixel_values" in graph.input_names():
        images = batch + 1 if isinstance(graph, SimilarityGraph) else batch
        inputs["pixel_values"] = torch.randn(
            images, vision.num_channels, vision.image_size, vision.image_size, generator=g
        )
    if "input_ids" in graph.input_names():
        eos = body.config.eos_token_id
        eos = text.vocab_size - 1 if eos is None or eos == 2 else eos  # what eos_positions looks for
        ids = torch.randint(min(4, text.vocab_size - 2), text.vocab_size - 1, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)  # (B, T)
        for row in range(batch):
            real = max(2, length // (row + 1))
            mask[row, real:] = 0
            ids[row, real - 1] = eos
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        inputs["input_ids"], inputs["attention_mask"] = ids.masked_fill(mask == 0, pad), mask
    return inputs
