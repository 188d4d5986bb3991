"""BART and mBART specifics: the position table's two offset rows, pre-LN with final norms."""

from __future__ import annotations

import torch
from conftest import hf_model
from safetensors.torch import load_file

from graft.loading import load_model, save_model


def test_the_position_table_keeps_its_offset_rows_and_every_position_is_usable(tmp_path):
    ref = hf_model("bart", "seq2seq")
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", kernels=False)
    enc = model.body.config.encoder
    assert enc.position_offset == 2 and enc.max_positions == 42  # 40 positions after 2 unused rows
    ids = torch.randint(3, 99, (1, 40))  # the longest input the model takes
    with torch.no_grad():
        expected = ref(input_ids=ids, decoder_input_ids=ids).logits
        got = model(input_ids=ids, decoder_input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    save_model(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    table = ref.model.encoder.embed_positions.weight
    assert torch.equal(saved["model.encoder.embed_positions.weight"], table)  # rows 0 and 1 too


def test_mbart_is_pre_ln_with_a_final_norm_and_scaled_embeddings(tmp_path):
    hf_model("mbart").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=False)
    for stack in (model.encoder, model.decoder):
        cfg = stack.config
        assert cfg.prenorm and cfg.final_norm and cfg.scale_embeddings and stack.norm is not None
    bart = hf_model("bart")
    bart.save_pretrained(tmp_path / "bart")
    plain = load_model(tmp_path / "bart", kernels=False)
    assert not plain.encoder.config.prenorm and plain.encoder.norm is None
