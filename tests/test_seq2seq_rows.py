"""Seq2SeqHead's training path: the output layer runs only at the labelled target positions, and the
loss and every gradient are those of the full logits (the vocabulary-wide layer is most of a step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model
from test_seq2seq_families import ENCODER_DECODERS, batch

from graft.loading import load_model
from graft.train.config import TaskSection
from graft.train.losses import make_loss

TOLERANCE = 1e-6  # relative to the largest magnitude of each compared tensor


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOLERANCE * max(float(b.abs().max()), 1e-30)


def training_batch(family: str) -> dict[str, torch.Tensor]:
    """The families' test batch with its padded target positions as -100 labels."""
    b = batch(family=family)
    labels = b["decoder_input_ids"].masked_fill(b["decoder_attention_mask"] == 0, -100)  # (3, 6)
    encoder = {k: v for k, v in b.items() if not k.startswith("decoder_")}
    return {**encoder, "decoder_input_ids": b["decoder_input_ids"], "labels": labels}


@pytest.mark.parametrize("family", ENCODER_DECODERS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_training_on_target_rows_gives_the_loss_and_gradients_of_the_full_logits(family, smoothing, tmp_path):
    hf_model(family, "seq2seq").save_pretrained(tmp_path)
    model = load_model(tmp_path).train()  # dropout on: each pass draws the same masks from one seed
    b = training_batch(family)
    labels = b["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    # the trainer's loss: the head's, or make_loss's when label smoothing is asked for
    custom = make_loss(TaskSection(name="seq2seq", label_smoothing=smoothing), "seq2seq")

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return model.head.loss(logits, labels, b) if custom is None else custom[0](logits, b)

    results = []
    for rows in (False, True):
        model.zero_grad()
        torch.manual_seed(0)
        if rows:  # labels given, train mode, gradients on: the head's row path
            logits = model(**b).logits
            assert logits.shape == (int((labels != -100).sum()), model.config.decoder.vocab_size)
        else:  # no labels: the full (B, T, V) logits, scored outside
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            assert logits.shape[:-1] == labels.shape
            expected = F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100, label_smoothing=smoothing
            )
            assert close(loss_of(logits).detach(), expected.detach())
        loss = loss_of(logits)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (full, full_grads), (part, part_grads) = results
    assert close(part, full), (float(part), float(full))
    assert full_grads.keys() == part_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name, g in full_grads.items():
        assert close(part_grads[name], g), name


@pytest.mark.parametrize("family", ["t5"])
def test_eval_mode_and_no_grad_keep_the_full_logits(family, tmp_path):
    """Evaluation and scoring read every position's logits, labels or not."""
    hf_model(family, "seq2seq").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    b = training_batch(family)
    width = (*b["labels"].shape, model.config.decoder.vocab_size)
    assert model.eval()(**b).logits.shape == width
    with torch.no_grad():
        assert model.train()(**b).logits.shape == width
