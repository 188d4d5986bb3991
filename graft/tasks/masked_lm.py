"""Masked language modelling: predict the tokens hidden behind [MASK] (BERT, RoBERTa, DistilBERT, ALBERT).

Training (train mode, gradients on, labels given) runs the head only at the masked positions, as
the seq2seq head does at its labelled ones: the loss reads nothing else, and the vocabulary-wide
projection at every position cost about a third of MiniLM's pretraining step for nothing (the
logits are then (N, V), one row per masked token, in the labels' row-major order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.data.masking import IGNORE, check_probability, mask_tokens, word_tensor
from graft.errors import GraftError
from graft.kernels.int8 import tied_output
from graft.metrics import perplexity
from graft.nn import Transformer, TransformerOutput
from graft.nn.feedforward import ACTIVATIONS
from graft.tasks.base import Head
from graft.tasks.collate import field, model_inputs, window
from graft.tasks.hf_layout import hf_mlm_head


class MaskedLMHead(Head):
    """Hidden states -> dense -> activation -> LayerNorm -> vocabulary logits.

    The decoder's weight is the word embeddings' when tied (as in every published MLM checkpoint),
    so a checkpoint holds only the transform and the decoder's bias; ALBERT's transform maps
    hidden_size down to its embedding_size.
    """

    task = "masked-lm"

    def __init__(
        self, body: Transformer, mask_probability: float = 0.15, whole_word: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        cfg = body.config
        self.config = cfg
        self.spec = hf_mlm_head(cfg)
        self.activation = self.spec.activation or cfg.activation
        width = cfg.embedding_size or cfg.hidden_size  # the word embeddings' width
        std = cfg.hf_config.get("initializer_range", 0.02)
        self.dense = nn.Linear(cfg.hidden_size, width)
        nn.init.normal_(self.dense.weight, std=std)
        nn.init.zeros_(self.dense.bias)
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.decoder = nn.Linear(width, cfg.vocab_size)
        nn.init.zeros_(self.decoder.bias)
        self.tied = cfg.tie_word_embeddings
        if self.tied:
            self.decoder = tied_output(body.embed.tokens, self.decoder)  # int8 when the table is
        else:
            nn.init.normal_(self.decoder.weight, std=std)
        # how collate masks: dynamic masks drawn from this head's own generator (seeded)
        self.mask_probability = check_probability(mask_probability)
        self.whole_word = whole_word
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, out: TransformerOutput, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T, V) logits; (N, V) at the N masked positions when training (see the module)."""
        hidden = out.last_hidden_state  # (B, T, H)
        labels = batch.get("labels")
        if self.training and torch.is_grad_enabled() and labels is not None:
            hidden = hidden[labels != IGNORE]  # (N, H): the rows the loss reads
        x = self.dense(hidden)  # (..., E)
        x = self.norm(ACTIVATIONS[self.activation](x))
        return self.decoder(x)  # (..., V)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the masked positions (label -100 elsewhere), from (B, T, V) logits
        or forward's (N, V) training rows; 0 when none is masked (a batch of short texts may draw no
        mask: no signal, rather than a NaN that ends the run)."""
        if logits.shape[:-1] != labels.shape:
            labels = labels[labels != IGNORE]  # (N,)
        if not bool((labels != IGNORE).any()):
            return logits.float().sum() * 0.0
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
        )

    def count(self, labels: torch.Tensor, batch: dict[str, Any]) -> int:
        return int((labels != IGNORE).sum())

    def hf_names(self) -> dict[str, str]:
        return self.spec.names(self.tied)

    def tied_hf_names(self) -> tuple[str, ...]:
        # older checkpoints (pytorch_model.bin) also hold the decoder's weight and bias, copies of the
        # word embeddings and of the bias saved under its own name
        copies = [f"{self.spec.decoder}.weight"] if self.tied else []
        if f"{self.spec.decoder}.bias" != self.spec.bias:  # DistilBERT's bias has no second name
            copies.append(f"{self.spec.decoder}.bias")
        return tuple(copies)

    # ---- records in, predictions out ----
    def collate(
        self, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None
    ) -> dict[str, Any]:
        """``text`` of each record, tokenized, with fresh masks drawn for this batch (80/10/10; whole
        words when ``whole_word``); ``labels`` hold the original ids of the masked tokens."""
        if tokenizer.mask_token_id is None:
            raise GraftError(
                "masked-lm: the tokenizer has no mask token (mask_token in tokenizer_config.json)"
            )
        texts = field(records, "text", self.task)
        enc = tokenizer.encode(texts, max_length=window(self.config, tokenizer, max_length), truncation=True)
        ids = enc.input_ids  # (B, T)
        maskable = (enc.special_tokens_mask == 0) & (enc.attention_mask == 1)  # (B, T)
        words = word_tensor(enc.word_ids, ids.shape[1]) if self.whole_word else None
        vocab = min(len(tokenizer), self.config.vocab_size)  # random replacements: ids the model has
        inputs, labels = mask_tokens(
            ids, maskable, tokenizer.mask_token_id, vocab, self.generator, self.mask_probability, words
        )
        batch: dict[str, Any] = model_inputs(enc, self.config)
        batch["input_ids"], batch["labels"] = inputs, labels
        return batch

    def postprocess(
        self, logits: torch.Tensor, batch: dict[str, Any], **options: Any
    ) -> list[dict[str, Any]]:
        """{'nll', 'tokens'} per record: summed negative log-likelihood of its masked tokens."""
        labels = batch["labels"]  # (B, T)
        nll = F.cross_entropy(
            logits.detach().float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )  # (B, T)
        counts = (labels != IGNORE).sum(1)
        return [{"nll": float(n), "tokens": int(c)} for n, c in zip(nll.sum(1), counts, strict=True)]

    def evaluate(self, predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean loss per masked token and its perplexity over the whole set."""
        tokens = sum(p["tokens"] for p in predictions)
        loss = sum(p["nll"] for p in predictions) / max(tokens, 1)
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
