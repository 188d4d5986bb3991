"""Pretraining's data: packed rows give every document exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

from graft.data.packing import IGNORE, pack_rows, packed_batch
from graft.errors import GraftError
from graft.loading import load_model
from graft.models import FAMILIES

TOL = 1e-5
DECODERS = sorted(name for name, f in FAMILIES.items() if f.decoder)
ENCODERS = sorted(name for name, f in FAMILIES.items() if not f.decoder and f.inputs == "tokens")


def documents(lengths=(7, 3, 12, 1, 5, 9, 4), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]


def first_position(model) -> int:
    cfg = model.config
    return cfg.pad_token_id + 1 if cfg.positions_from_padding else 0


def test_rows_hold_whole_documents_in_order_and_cut_long_ones():
    rows = pack_rows(documents(), 12)
    assert [[len(d) for d in row] for row in rows] == [[7, 3], [12], [1, 5], [9], [4]]
    assert [t for row in rows for d in row for t in d] == [t for d in documents() for t in d]
    assert [[len(d) for d in row] for row in pack_rows([list(range(25))], 10)] == [[10], [10], [5]]
    with pytest.raises(GraftError, match="^packing: the row width must be at least 1, found 0$"):
        pack_rows(documents(), 0)


def test_positions_restart_and_no_token_sees_another_document():
    batch = packed_batch(pack_rows(documents(), 12), pad_id=1, causal=True, first_position=2)
    assert batch["position_ids"][0].tolist() == [2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 2, 2]  # RoBERTa-style offset
    assert batch["labels"][0, 7].item() == IGNORE  # the 2nd document's first token: nothing predicts it
    docs, mask = batch["documents"], batch["attention_mask"][:, 0]  # (B, T), (B, T, T)
    cross = (docs[:, :, None] != docs[:, None, :]) & mask
    assert not cross[docs >= 0].any()  # a real query never attends another document (or padding)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_packed_causal_lm_losses_equal_each_document_alone(family, kernels, tmp_path):
    hf_model(family, "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    docs = documents()
    cfg = model.config
    batch = packed_batch(pack_rows(docs, 16), 0, True, first_position(model), cfg.sliding_window)
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none"
        )  # (B, T - 1)
        packed = []
        for b in range(nll.shape[0]):
            for d in range(int(batch["documents"][b].max()) + 1):
                packed.append(nll[b][batch["documents"][b, 1:] == d].sum())
        alone = []
        for doc in docs:
            ids = torch.tensor([doc])
            out = model(input_ids=ids, labels=ids)
            alone.append(out.loss * (len(doc) - 1) if len(doc) > 1 else torch.tensor(0.0))
    assert len(packed) == len(alone)
    for doc, p, a in zip(docs, packed, alone, strict=True):
        assert abs(p - a) / max(len(doc) - 1, 1) <= TOL  # per-document mean loss


@pytest.mark.parametrize("family", ENCODERS)
def test_packed_encoder_outputs_equal_each_document_alone(family, tmp_path):
    """Bidirectional within a document only, positions from each document's start (RoBERTa: pad + 1)."""
    hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=False)
    docs = documents()
    batch = packed_batch(pack_rows(docs, 16), model.config.pad_token_id, False, first_position(model))
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state  # (B, T, H)
        i = 0
        for b in range(packed.shape[0]):
            for d in range(int(batch["documents"][b].max()) + 1):
                alone = model(input_ids=torch.tensor([docs[i]])).last_hidden_state[0]  # (n, H)
                assert (packed[b][batch["documents"][b] == d] - alone).abs().max() <= TOL
                i += 1
    assert i == len(docs)
