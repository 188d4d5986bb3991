"""The masked-lm head: every family with a transformers *ForMaskedLM class matches it, keeps its
pretrained head when loaded, and saves a checkpoint transformers loads."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_hf_config

from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.tasks import HEADS, TaskModel

TOL = 1e-5
MLM_FAMILIES = sorted(name for name, f in FAMILIES.items() if "masked-lm" in f.architectures)
OTHERS = sorted(name for name, f in FAMILIES.items() if "masked-lm" not in f.architectures)


def hf_mlm(family: str) -> transformers.PreTrainedModel:
    """A random tiny *ForMaskedLM with non-trivial biases and norms (its MLM head's too)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(tiny_hf_config(family), attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=[False, True], ids=["reference", "kernels"])
def kernels(request) -> bool:
    return request.param


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every third real token is in the loss."""
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return labels.masked_fill(mask == 0, -100)


def test_the_registry_declares_every_transformers_mlm_family():
    assert MLM_FAMILIES == ["albert", "bert", "distilbert", "roberta"]
    assert "masked-lm" in HEADS


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_masked_lm_logits_and_loss_match_transformers(family, tmp_path, kernels):
    ref = hf_mlm(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    assert isinstance(model, TaskModel) and model.task == "masked-lm"
    ids, mask = padded_batch()
    labels = labels_for(ids, mask)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert expected.logits.abs().max() > 0.1  # not a degenerate comparison
    assert (expected.logits[keep] - got.logits[keep]).abs().max() <= TOL
    assert abs(expected.loss.item() - got.loss.item()) <= TOL
    assert model.head.count(labels, {}) == int((labels != -100).sum())


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_pretrained_mlm_head_is_kept_and_saved_for_transformers(family, tmp_path, caplog):
    ref = hf_mlm(family)
    ref.save_pretrained(tmp_path / "ref")
    with caplog.at_level(logging.INFO, logger="graft"):
        model = load_model(tmp_path / "ref", kernels=False)
    assert not [r for r in caplog.records if "masked-lm head" in r.getMessage()]  # loaded, not new
    assert model.head.decoder.weight is model.body.embed.tokens.weight  # tied, as in transformers
    save_model(model, tmp_path / "graft")
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "graft").eval()
    assert type(again) is type(ref)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name  # every tensor, head included
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (
            again(input_ids=ids, attention_mask=mask).logits
            - model(input_ids=ids, attention_mask=mask).logits
        )
    assert diff[mask.bool()].abs().max() <= TOL


def test_a_base_checkpoint_gets_a_new_head_said_once(minilm, caplog):
    with caplog.at_level(logging.INFO, logger="graft"):
        model = load_model(minilm, task="masked-lm", to_train=True)
    said = [r.getMessage() for r in caplog.records if "masked-lm head" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        "no masked-lm head in this checkpoint; a new one is initialized to train"
    )
    assert model.body.pooler is None  # BertForMaskedLM has no pooler
    assert torch.equal(model.head.decoder.bias, torch.zeros(model.config.vocab_size))


@pytest.mark.parametrize("family", OTHERS)
def test_families_without_a_masked_lm_class_refuse_the_task(family, tmp_path):
    config = tiny_hf_config(family)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(GraftError) as e:
        load_model(tmp_path, task="masked-lm")
    assert str(e.value) == (
        f"a {family} model has no masked-lm head (families with one: albert, bert, distilbert, roberta)"
    )


def test_export_refuses_a_masked_lm_in_one_line(tmp_path):
    from graft.export import export_model

    hf_mlm("bert").save_pretrained(tmp_path / "hf")
    with pytest.raises(GraftError) as e:
        export_model(load_model(tmp_path / "hf"), tmp_path / "out")
    assert str(e.value).startswith("export: the masked-lm task cannot be exported (known: base, ")
    assert not (tmp_path / "out").exists()
