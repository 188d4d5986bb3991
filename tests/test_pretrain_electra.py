"""ELECTRA: the discriminator learns exactly which tokens the generator replaced."""

from __future__ import annotations

import json

import torch
import transformers
import yaml
from safetensors.torch import load_file
from test_pretrain import LINES, tiny_folder, write_recipe

from graft.data.masking import IGNORE
from graft.pretrain.electra import load_electra, rtd_labels
from graft.pretrain.stream import mlm_batches
from graft.tokenizer import Tokenizer
from graft.train.config import load_recipe


def electra(tmp_path, minilm, **pretrain):
    base = tiny_folder(tmp_path, minilm, "bert")
    recipe = write_recipe(tmp_path, base, "electra")
    overrides = [f"pretrain.{k}={v}" for k, v in pretrain.items()]
    return load_electra(base, load_recipe(recipe, overrides)), Tokenizer.from_folder(base)


def test_labels_are_exactly_the_replaced_positions(tmp_path, minilm):
    model, tokenizer = electra(tmp_path, minilm, mask_probability=0.5)
    batch = model.generator.head.collate([{"text": t} for t in LINES], tokenizer, 16)
    masked = batch["labels"] != IGNORE  # (B, T)
    original = torch.where(masked, batch["labels"], batch["input_ids"])
    # a generator sure of the original token in rows 0 and 2, of token 7 in rows 1 and 3
    logits = torch.full((*original.shape, 30522), -1e4)
    logits.scatter_(2, original[..., None], 1e4)
    logits[1::2] = -1e4
    logits[1::2, :, 7] = 1e4
    fake, same = model.replace(batch, logits)
    assert torch.equal(same, original)
    assert torch.equal(fake[~masked], original[~masked])  # only masked positions are sampled
    labels = rtd_labels(fake, original, batch["attention_mask"])
    replaced = masked.clone()
    replaced[0::2] = False  # sampled the original token: not replaced
    replaced &= original != 7
    real = batch["attention_mask"] == 1
    assert replaced.any() and torch.equal(labels[real] == 1, replaced[real])
    assert (labels[~real] == IGNORE).all()
    # with the real generator's samples too: 1 exactly where the input differs from the text
    fake, _ = model.replace(batch, model.generator(**batch).logits)
    labels = rtd_labels(fake, original, batch["attention_mask"])
    assert torch.equal(labels[real] == 1, (fake != original)[real])


def test_packed_rows_label_every_real_token_and_no_padding(tmp_path, minilm):
    """pretrain.pack: the discriminator judges each packed document's tokens, never the row's padding."""
    model, tokenizer = electra(tmp_path, minilm, mask_probability=0.5)
    texts = [*LINES, "Ay.", "Farewell, my lord."]
    batch = next(mlm_batches(iter(texts), model.generator.head, tokenizer, batch_size=3, max_length=32))
    documents = batch["documents"]  # (B, T): -1 on padding
    assert int(documents.max()) >= 1 and (documents < 0).any()  # rows of several documents, padded
    with torch.no_grad():
        loss, count = model(**batch)
    assert count == int((documents >= 0).sum()) and torch.isfinite(loss)


def test_generator_is_smaller_and_shares_the_embeddings(tmp_path, minilm):
    model, _ = electra(tmp_path, minilm)
    assert model.generator.body.embed is model.discriminator.body.embed
    assert model.generator.head.decoder.weight is model.discriminator.body.embed.tokens.weight
    assert len(model.generator.body.layers) == 1 < len(model.discriminator.body.layers) == 2


def test_pretrain_electra_saves_discriminator_and_generator(cli, tmp_path, minilm):
    base = tiny_folder(tmp_path, minilm, "bert")
    recipe = write_recipe(tmp_path, base, "electra")
    summary = json.loads(cli("pretrain", recipe).ok().stdout)
    assert summary["objective"] == "electra" and summary["tokens"] > 0
    out = tmp_path / "out"
    disc = transformers.AutoModelForTokenClassification.from_pretrained(out)
    gen = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator")
    assert type(disc) is transformers.BertForTokenClassification and disc.config.num_labels == 1
    assert type(gen) is transformers.BertForMaskedLM and gen.config.num_hidden_layers == 1
    assert torch.equal(
        disc.bert.embeddings.word_embeddings.weight, gen.bert.embeddings.word_embeddings.weight
    )
    before = load_file(base / "model.safetensors")["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(before, disc.bert.embeddings.word_embeddings.weight)  # trained, shared


def test_electra_refusals_are_one_line(cli, tmp_path, minilm):
    albert = tiny_folder(tmp_path, minilm, "albert")
    recipe = write_recipe(tmp_path, albert, "electra")
    assert cli("pretrain", recipe).error_line() == (
        "error: electra: albert shares its layers across depths, so it has no first layers to make a"
        " generator of; use bert, distilbert or roberta"
    )
    bert = tiny_folder(tmp_path, minilm, "bert")
    assert cli("pretrain", recipe, f"model.path={bert}", "pretrain.generator_layers=3").error_line() == (
        "error: pretrain.generator_layers: 3, but the model has 2 layers (e.g. pretrain.generator_layers=1)"
    )
    gpt2 = tiny_folder(tmp_path, minilm, "gpt2")
    assert cli("pretrain", recipe, f"model.path={gpt2}").error_line() == (
        f"error: {recipe}: pretrain.objective: electra needs a masked-LM family (albert, bert, distilbert,"
        " roberta); a gpt2 model trains with clm"
    )
    assert yaml
