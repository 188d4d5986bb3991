"""T5 specifics: v1.1 / Flan-T5 (gated GELU, an output layer of its own, no rescaling), however
its config.json says so, and config.json values graft cannot build."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.errors import GraftError
from graft.loading import load_model, save_model


def v11(tmp_path, tie_in_config: bool):
    """A tiny T5 v1.1 with its own lm_head, saved as transformers 4 did (tie_word_embeddings: false)
    or as transformers 5 does (tie_word_embeddings: true, scale_decoder_outputs: false, both tables)."""
    import transformers as tr

    torch.manual_seed(0)
    config = tr.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=20, tie_word_embeddings=False,
        decoder_start_token_id=0,
    )  # fmt: skip
    ref = tr.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        ref.lm_head.weight = torch.nn.Parameter(torch.randn(99, 32))  # untied, as v1.1 checkpoints are
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    state = ref.state_dict()
    state = {k: v.clone() for k, v in state.items() if "embed_tokens" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})  # lm_head.weight included
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["tie_word_embeddings"] = tie_in_config
    if not tie_in_config:
        hf.pop("scale_decoder_outputs", None)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return ref


@pytest.mark.parametrize(
    "tie_in_config", [False, True], ids=["transformers-4-config", "transformers-5-config"]
)
def test_t5_v1_1_with_its_own_output_layer_matches_transformers(tmp_path, tie_in_config):
    ref = v11(tmp_path / "hf", tie_in_config)
    model = load_model(tmp_path / "hf")
    assert model.body.config.decoder.gated and model.body.config.decoder.activation == "gelu_tanh"
    assert not model.head.tied and model.head.scale is None
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(2, 99, (2, 7), generator=g), torch.randint(2, 99, (2, 4), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    assert (got - expected).abs().max() <= 1e-5
    save_model(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["feed_forward_proj"] == "gated-gelu" and saved["tie_word_embeddings"] is False
    assert saved["scale_decoder_outputs"] is False
    assert torch.equal(
        load_file(tmp_path / "ours" / "model.safetensors")["lm_head.weight"], ref.lm_head.weight
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feed_forward_proj": "gated-swish-x"}, 'feed_forward_proj "gated-swish-x" is not supported'),
        ({"feed_forward_proj": "tanh"}, 'feed_forward_proj "tanh" is not supported'),
        ({"d_kv": 0}, "d_kv must be an integer >= 1, found 0"),
        ({"scale_decoder_outputs": "yes"}, "scale_decoder_outputs must be true or false"),
    ],
)
def test_config_values_graft_cannot_build_are_one_line(tmp_path, change, message):
    from conftest import hf_model

    hf_model("t5", "seq2seq").save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
    with pytest.raises(GraftError, match=f"^{tmp_path}/config.json: {message}"):
        load_model(tmp_path)
