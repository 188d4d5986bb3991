"""Every encoder-decoder family of the registry against transformers' tiny random models: loaded
through graft.loading from a saved HF folder, bare and with the seq2seq head, padded inputs, both
the reference and the kernels; saved back in a folder transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, tiny_hf_config

from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.nn import EncoderDecoder
from graft.tasks import HEADS, Seq2SeqHead, TaskModel

ENCODER_DECODERS = [name for name, family in FAMILIES.items() if family.encoder_decoder]
MODES = pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])


def test_every_encoder_decoder_family_has_a_tiny_reference():
    assert {"bart", "mbart", "t5", "mt5"} <= set(ENCODER_DECODERS)
    for name in ENCODER_DECODERS:
        assert tiny_hf_config(name).is_encoder_decoder


def reference(family: str, task: str = "base") -> torch.nn.Module:
    ref = hf_model(family, task)
    with torch.no_grad():  # a non-zero final_logits_bias (BART), so that loading it is tested
        for name, buffer in ref.named_buffers():
            if name.endswith("final_logits_bias"):
                buffer.add_(torch.randn_like(buffer))
    return ref


def batch(first: int = 3, family: str = "") -> dict[str, torch.Tensor]:
    """Encoder ids (3, 9) with two padded rows; decoder ids (3, 6) with one padded row. Whisper's
    encoder reads (3, 8, 24) log-mel frames instead, whole windows with no mask."""
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(first, 99, (3, 9), generator=g), torch.randint(first, 99, (3, 6), generator=g)
    mask, target_mask = torch.ones_like(ids), torch.ones_like(target)
    mask[1, 6:], mask[2, 2:], target_mask[0, 4:] = 0, 0, 0
    encoder = {"input_ids": ids, "attention_mask": mask}
    if family == "whisper":
        encoder = {"input_features": torch.randn(3, 8, 24, generator=g)}
    return {**encoder, "decoder_input_ids": target, "decoder_attention_mask": target_mask}


def seq2seq_class(family: str):
    import transformers as tr

    return tr.AutoModelForSpeechSeq2Seq if family == "whisper" else tr.AutoModelForSeq2SeqLM


@pytest.mark.parametrize("family", ENCODER_DECODERS)
@MODES
def test_base_model_matches_transformers(family, use_kernels, tmp_path):
    ref = reference(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=use_kernels)
    assert isinstance(model, EncoderDecoder)
    b = batch(family=family)
    with torch.no_grad():
        expected = ref(**b)
        got = model(**b)
    real = b.get("attention_mask", torch.ones(expected.encoder_last_hidden_state.shape[:2])).bool()
    real_target = b["decoder_attention_mask"].bool()
    assert expected.last_hidden_state.abs().max() > 0.1
    enc_diff = got.encoder_last_hidden_state[real] - expected.encoder_last_hidden_state[real]
    assert enc_diff.abs().max() <= 1e-5
    assert (got.last_hidden_state[real_target] - expected.last_hidden_state[real_target]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ENCODER_DECODERS)
@MODES
def test_seq2seq_model_matches_transformers_logits_and_loss(family, use_kernels, tmp_path):
    """Logits and the loss over labels (padding -100) of ...ForConditionalGeneration at 1e-5."""
    ref = reference(family, "seq2seq")
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=use_kernels)
    assert isinstance(model, TaskModel) and model.task == "seq2seq"
    b = batch(family=family)
    labels = b["decoder_input_ids"].masked_fill(b["decoder_attention_mask"] == 0, -100)
    encoder = {k: v for k, v in b.items() if not k.startswith("decoder_")}
    with torch.no_grad():
        expected = ref(**encoder, labels=labels)
        # graft's collation shifts the labels itself; here the decoder inputs are transformers' own
        if family == "whisper":  # shifted as WhisperForConditionalGeneration does with labels alone
            from transformers.models.whisper.modeling_whisper import shift_tokens_right

            decoder_ids = shift_tokens_right(
                labels, ref.config.pad_token_id, ref.config.decoder_start_token_id
            )
        else:
            decoder_ids = ref.prepare_decoder_input_ids_from_labels(labels=labels)
        got = model(**encoder, decoder_input_ids=decoder_ids, labels=labels)
    real = labels != -100
    assert (got.logits[real] - expected.logits[real]).abs().max() <= 1e-5
    assert abs(float(got.loss) - float(expected.loss)) <= 1e-5


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_saved_folder_loads_in_transformers_with_the_same_logits(family, tmp_path):
    ref = reference(family, "seq2seq")
    ref.save_pretrained(tmp_path / "ref")
    model = load_model(tmp_path / "ref", kernels=False)
    save_model(model, tmp_path / "ours")
    again = seq2seq_class(family).from_pretrained(tmp_path / "ours").eval()
    b = batch(family=family)
    with torch.no_grad():
        expected = ref(**b).logits
        got = again(**b).logits
    assert torch.equal(got, expected)
    # and graft reads its own folder back: the same weights, tied tables still one
    back = load_model(tmp_path / "ours", kernels=False)
    if back.body.config.share_embeddings:
        assert back.body.decoder.embed.tokens.weight is back.body.encoder.embed.tokens.weight
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_base_folder_saves_as_the_base_class(family, tmp_path):
    import transformers as tr

    ref = reference(family)
    ref.save_pretrained(tmp_path / "ref")
    save_model(load_model(tmp_path / "ref", kernels=False), tmp_path / "ours")
    again = tr.AutoModel.from_pretrained(tmp_path / "ours").eval()
    assert type(again) is type(ref)
    b = batch(family=family)
    with torch.no_grad():
        assert torch.equal(again(**b).last_hidden_state, ref(**b).last_hidden_state)


def test_seq2seq_head_on_a_single_stack_is_a_one_line_error(tmp_path):
    ref = hf_model("bert")
    ref.save_pretrained(tmp_path)
    with pytest.raises(GraftError, match="^seq2seq: a bert model has no decoder to generate with"):
        Seq2SeqHead(load_model(tmp_path, kernels=False))


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_a_missing_decoder_tensor_is_named(family, tmp_path):
    from safetensors.torch import load_file, save_file

    reference(family).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = next(k for k in state if k.startswith("decoder.") and "embed" not in k)
    del state[name]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GraftError, match=f"model.safetensors: missing tensor '{name}'"):
        load_model(tmp_path)


@pytest.mark.parametrize("task", sorted(set(HEADS) - {"seq2seq"}))
def test_other_heads_on_an_encoder_decoder_are_a_one_line_error(task, tmp_path):
    reference("bart").save_pretrained(tmp_path)
    with pytest.raises(
        GraftError, match=f"^{task}: a bart model is an encoder-decoder; load it as task seq2seq"
    ):
        load_model(tmp_path, task=task)
