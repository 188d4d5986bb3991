"""A task model: a transformer body and a task head (chapter 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn import DualEncoder, EncoderDecoder, Transformer, TransformerConfig, TransformerOutput
from graft.tasks.pooling import set_pooler


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden: TransformerOutput | None = None


class Head(nn.Module):
    """A task head: turns the body's output into logits, and logits + labels into a loss.

    Subclasses set ``task`` (the registry key) and implement forward and (for training) loss;
    ``hf_names``/``hf_config``/``options_from_hf`` map their weights and options to a Hugging Face
    task checkpoint. Around the model, a head also turns records into batches (``collate``),
    logits into predictions (``postprocess``) and predictions into metrics (``evaluate``), so
    that training, ``graft predict`` and ``graft eval`` share one implementation per task.
    """

    task: str = ""
    reads_pooler: bool = False  # whether forward uses the body's pooled output
    inputs: str = "tokens"  # what the body under it reads (TransformerConfig.inputs)

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """(B, K) the only positions of the body's output that forward reads (None: all of them)."""
        return None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        """How many items ``loss`` averages over (examples by default)."""
        return labels.shape[0]

    def hf_names(self) -> dict[str, str]:
        """HF tensor name -> this head's parameter name (empty when tied or weightless)."""
        return {}

    def tied_hf_names(self) -> tuple[str, ...]:
        """HF tensors that are a body weight this head is tied to (older checkpoints save them too)."""
        return ()

    def hf_config(self) -> dict[str, Any]:
        """Keys this head adds to config.json (labels, problem type...)."""
        return {}

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """Constructor options read back from config.json (the inverse of hf_config)."""
        return {}

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """Records -> a batch: the model's input tensors, ``labels`` when every record has them,
        and what ``postprocess`` needs (offsets, words...)."""
        raise NotImplementedError(f"{type(self).__name__} has no collate")

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """Logits of a collated batch -> one JSON-ready prediction per record."""
        raise NotImplementedError(f"{type(self).__name__} has no postprocess")

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Predictions (from postprocess) against the records' labels -> metrics."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate")


BODY_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "cache",
    # an encoder-decoder's (graft.nn.EncoderDecoder): the decoder's inputs, an encoder output computed
    # once, images or audio for the encoder
    "decoder_input_ids",
    "decoder_attention_mask",
    "encoder_outputs",
    "pixel_values",
    "input_features",
)


def body_inputs(head: Head, batch: dict[str, Any]) -> dict[str, Any]:
    """The body's keyword arguments for a batch: its tensors, and the rows the head reads."""
    inputs = {k: batch[k] for k in BODY_INPUTS if k in batch}
    rows = head.rows(batch)
    if rows is not None:
        inputs["rows"] = rows
    return inputs


class TaskModel(nn.Module):
    """body + head; ``model(**batch)`` gives logits, and a loss when the batch has labels.

    The body's pooler is dropped when the head does not read it, as transformers' task classes
    have none then (BertForTokenClassification): no weights without gradients, and a saved task
    checkpoint holds exactly the tensors of its HF class.
    """

    def __init__(self, body: Transformer, head: Head) -> None:
        super().__init__()
        if getattr(body, "pooler", None) is not None and not head.reads_pooler:
            set_pooler(body, False)
        self.body = body
        self.head = head

    @property
    def config(self) -> TransformerConfig:
        return self.body.config

    @property
    def task(self) -> str:
        return self.head.task

    def forward(self, **batch: Any) -> TaskOutput:
        out = self.body(**body_inputs(self.head, batch))
        logits = self.head(out, batch)
        labels = batch.get("labels")
        loss = self.head.loss(logits, labels, batch) if labels is not None else None
        return TaskOutput(logits, loss, out)


def body_of(model: nn.Module) -> Transformer | EncoderDecoder | DualEncoder:
    """The transformer body of a bare body, a TaskModel or a MultitaskModel."""
    return model if isinstance(model, Transformer | EncoderDecoder | DualEncoder) else model.body


def stacks(body: Transformer | EncoderDecoder) -> list[tuple[str, Transformer]]:
    """The body's stacks of blocks with their name prefixes: ("", body), or an encoder-decoder's
    ("encoder.", encoder) and ("decoder.", decoder), bottom first."""
    if isinstance(body, EncoderDecoder):
        return [("encoder.", body.encoder), ("decoder.", body.decoder)]
    return [("", body)]


def one_stack(model: nn.Module, what: str) -> Transformer:
    """The model's one stack of blocks, or a one-line error naming ``what`` could not work on: an
    encoder-decoder (T5, BART, Whisper) and a dual encoder (CLIP) have two."""
    body = body_of(model)
    if not isinstance(body, Transformer):
        kind = "a text and an image tower" if hasattr(body, "towers") else "an encoder and a decoder"
        raise GraftError(
            f"{what}: a {body.config.family} model has two stacks ({kind}); {what} works on one stack"
        )
    return body
