"""Sequence to sequence (summarization, translation): an encoder-decoder with a language model head.

Records hold the source in ``text`` and the target in ``text_pair``. The decoder reads the target
shifted right behind the decoder start token and learns to predict it token by token; padding is
-100 in the labels, out of the loss, which is the mean over target tokens (``count`` says how
many, so that gradient accumulation weighs every target token alike).

Training (train mode, gradients on, labels given) computes the output layer only at the labelled
positions: the vocabulary-wide matrix multiplies are most of a small model's step, and padding adds
nothing to the loss either way, so the loss and every gradient are the same (the logits are then
(N, V), one row per label that is not -100, in the labels' row-major order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import GraftError
from graft.kernels.int8 import tied_output
from graft.nn import EncoderDecoder, Seq2SeqOutput
from graft.tasks.base import Head
from graft.tasks.collate import field, pad, window
from graft.tasks.hf_layout import hf_seq2seq_head
from graft.tasks.speech import collate_speech, speech_metrics

IGNORE = -100  # label of target positions that are not in the loss (padding)


def shift_right(labels: torch.Tensor, start: int, pad_id: int) -> torch.Tensor:
    """(B, T) labels -> (B, T) decoder inputs: the start token, then the labels but the last; -100 -> pad."""
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, pad_id)


class Seq2SeqHead(Head):
    """The decoder's hidden states -> vocabulary logits (tied to the token table unless the
    checkpoint has its own output layer), laid out as the family's HF class has it."""

    task = "seq2seq"

    def __init__(self, body: EncoderDecoder, scale_output: bool = False) -> None:
        super().__init__()
        if not isinstance(body, EncoderDecoder):
            raise GraftError(
                f"seq2seq: a {body.config.family} model has no decoder to generate with (seq2seq needs an "
                "encoder-decoder: T5, BART...)"
            )
        cfg = body.config
        self.config = cfg
        self.inputs = cfg.encoder.inputs  # tokens, or audio_frames (Whisper: graft.tasks.speech)
        self.layout = hf_seq2seq_head(cfg.family)
        dec = cfg.decoder
        self.proj = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)
        self.tied = dec.tie_word_embeddings
        if self.tied:
            self.proj = tied_output(body.decoder.embed.tokens, self.proj)  # int8 when the table is
        self.scale = dec.hidden_size**-0.5 if scale_output else None  # T5 v1.0
        if self.layout.bias:
            self.register_buffer("bias", torch.zeros(1, dec.vocab_size))
        else:
            self.bias = None

    def forward(self, out: Seq2SeqOutput, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T, V) logits; (N, V) at the N labels that are not -100 when training (see the module)."""
        hidden = out.last_hidden_state  # (B, T, H)
        keep = batch.get("logits_to_keep")
        labels = batch.get("labels")
        if keep:  # generation only needs the last position(s)
            hidden = hidden[:, -keep:]
        elif self.training and torch.is_grad_enabled() and labels is not None:
            hidden = hidden[labels != IGNORE]  # (N, H): the rows the loss reads
        if self.scale is not None:  # T5 rescales before its tied output layer
            hidden = hidden * self.scale
        logits = self.proj(hidden)  # (B, T, V)
        return logits + self.bias if self.bias is not None else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over target tokens: logits (B, T, V) aligned with the labels, or (N, V)
        at the labels that are not -100 (forward's training path)."""
        if logits.shape[:-1] != labels.shape:
            labels = labels[labels != IGNORE]  # (N,)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
        )

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        return int((labels != IGNORE).sum())

    def hf_names(self) -> dict[str, str]:
        names = {} if self.tied else {f"{self.layout.out}.weight": "proj.weight"}
        if self.layout.bias:
            names[self.layout.bias] = "bias"
        return names

    def tied_hf_names(self) -> tuple[str, ...]:
        return (f"{self.layout.out}.weight",) if self.tied else ()

    def hf_config(self) -> dict[str, Any]:
        return {self.layout.scale: self.scale is not None} if self.layout.scale else {}

    @classmethod
    def options_from_hf(cls, hf: dict[str, Any]) -> dict[str, Any]:
        key = hf_seq2seq_head(hf.get("model_type")).scale
        if key is None:
            return {}
        scale = hf.get(key, hf.get("tie_word_embeddings", True) is not False)
        if not isinstance(scale, bool):
            raise GraftError(f"config.json: {key} must be true or false, found {scale!r}")
        return {"scale_output": scale}

    # ---- records in, predictions out ----
    def start_token(self) -> int:
        start = self.config.decoder_start_token_id
        return start if start is not None else self.config.pad_token_id or 0

    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """Sources (``text``) -> input_ids, attention_mask; targets (``text_pair``, when every record has
        one) -> labels (padding -100) and decoder_input_ids (labels shifted right behind the start token)."""
        if self.inputs == "audio_frames":
            return collate_speech(self.config, records, tokenizer)  # Whisper (graft.tasks.speech)
        enc_limit = window(self.config.encoder, tokenizer, max_length)
        sources = field(records, "text", self.task)
        rows = [
            tokenizer.encode(text, padding=False, truncation=False, return_tensors=None).input_ids[0][
                :enc_limit
            ]
            for text in sources
        ]
        pad_id = self.config.pad_token_id or 0
        ids, mask = pad(rows, pad_id)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if all(r.get("text_pair") is not None for r in records):
            dec_limit = window(self.config.decoder, tokenizer, max_length)
            targets = [
                tokenizer.encode(t, padding=False, truncation=False, return_tensors=None).input_ids[0][
                    :dec_limit
                ]
                for t in field(records, "text_pair", self.task)
            ]
            labels, _ = pad(targets, IGNORE)
            batch["labels"] = labels
            batch["decoder_input_ids"] = shift_right(labels, self.start_token(), pad_id)
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'nll', 'tokens'} per record: summed negative log-likelihood of its target tokens (teacher
        forcing). Generated text comes from graft.generation (``graft predict`` and eval use it)."""
        labels = batch["labels"]
        nll = F.cross_entropy(
            logits.detach().float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )  # (B, T)
        counts = (labels != IGNORE).sum(1)
        return [{"nll": float(n), "tokens": int(c)} for n, c in zip(nll.sum(1), counts, strict=True)]

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Loss per target token (and perplexity) when the predictions have it; BLEU, chrF and
        ROUGE-1/2/L of the generated texts against the targets when they have those."""
        from graft.metrics import compute_metrics, perplexity

        metrics: dict[str, Any] = {}
        if predictions and "nll" in predictions[0]:
            tokens = sum(p["tokens"] for p in predictions)
            loss = sum(p["nll"] for p in predictions) / max(tokens, 1)
            metrics |= {"loss": loss, "perplexity": perplexity(loss)}
        if predictions and "generated" in predictions[0] and self.inputs == "audio_frames":
            metrics |= speech_metrics(predictions, records)  # WER and CER
        elif predictions and "generated" in predictions[0]:
            references = field(records, "text_pair", self.task)
            metrics |= compute_metrics("seq2seq", [p["generated"] for p in predictions], references)
        return metrics
