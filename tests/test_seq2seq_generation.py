"""Generation with encoder-decoders (T5, BART...): the same tokens as transformers' generate on tiny
random models, greedy and beam search; the encoder runs once and the cross-attention keys and
values are projected once per sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_hf_config

from graft.errors import GraftError
from graft.generation import GenerationConfig, generate, stream
from graft.loading import load_model
from graft.models import FAMILIES

ENCODER_DECODERS = [name for name, family in FAMILIES.items() if family.encoder_decoder]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """family -> (transformers' model, graft's with kernels, graft's reference)."""
    import transformers as tr

    out = {}
    for family in ENCODER_DECODERS:
        config = tiny_hf_config(family)
        if family == "t5":  # transformers' generate sizes T5's cache by the encoder's depth: keep them equal
            config.num_decoder_layers = config.num_layers
        torch.manual_seed(0)
        auto = tr.AutoModelForSpeechSeq2Seq if family == "whisper" else tr.AutoModelForSeq2SeqLM
        ref = auto.from_config(config).eval()
        with torch.no_grad():  # non-trivial norms; eos likely enough that rows end at different lengths
            for name, p in ref.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
            eos = ref.config.eos_token_id
            ref.get_output_embeddings().weight[eos].mul_(3.0)
        folder = tmp_path_factory.mktemp(family)
        ref.save_pretrained(folder)
        out[family] = (ref, load_model(folder), load_model(folder, kernels=False))
    return out


def source(family: str = "") -> dict[str, torch.Tensor]:
    """(3, 8) encoder ids, two rows padded on the right; for Whisper (3, 8, 24) log-mel frames."""
    g = torch.Generator().manual_seed(2)
    if family == "whisper":
        return {"input_features": torch.randn(3, 8, 24, generator=g)}
    ids = torch.randint(4, 99, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, 3:] = 0, 0
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


CASES = {
    "greedy": dict(num_beams=1),
    "greedy-no-repeat-2": dict(num_beams=1, no_repeat_ngram_size=2),
    "beam-4": dict(num_beams=4, length_penalty=1.0),
    "beam-3-length-penalty-2-no-repeat-3": dict(num_beams=3, length_penalty=2.0, no_repeat_ngram_size=3),
    "beam-3-early-stopping": dict(num_beams=3, early_stopping=True, length_penalty=0.5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ENCODER_DECODERS)
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_generate_equals_transformers_token_for_token(models, family, case, use_kernels):
    ref, fast, plain = models[family]
    model = fast if use_kernels else plain
    inputs = source(family)
    options = dict(max_new_tokens=12, **CASES[case])
    with torch.no_grad():
        expected = ref.generate(**inputs, do_sample=False, **options)
    if family == "whisper":  # transformers' Whisper returns the new tokens alone
        expected = torch.cat(
            [torch.full_like(expected[:, :1], ref.config.decoder_start_token_id), expected], 1
        )
    got = generate(model, **{"input_ids": None, **inputs}, **options)
    assert trimmed(got, ref) == trimmed(expected, ref) and got.shape == expected.shape


def trimmed(sequences: torch.Tensor, ref) -> list[list[int]]:
    """Each row up to its first eos after the start token: what follows is padding, which transformers'
    beam search writes as eos when pad_token_id is 0 (``pad_token_id or eos``), graft as pad."""
    eos = ref.config.eos_token_id
    rows = []
    for row in sequences.tolist():
        end = row.index(eos, 1) + 1 if eos in row[1:] else len(row)
        rows.append(row[:end])
    return rows


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_forced_decoder_tokens_and_forced_bos(models, family):
    """decoder_input_ids are the decoder's first tokens (Whisper's language and task); forced_bos_token_id
    is the first token after the start token (mBART's target language)."""
    ref, model, _ = models[family]
    inputs = source(family)
    start = ref.config.decoder_start_token_id
    forced = torch.tensor([[start, 7, 9]] * 3)
    with torch.no_grad():
        expected = ref.generate(**inputs, decoder_input_ids=forced, max_new_tokens=6, do_sample=False)
        expected_bos = ref.generate(**inputs, max_new_tokens=6, do_sample=False, forced_bos_token_id=11)
    if family == "whisper":  # transformers' Whisper returns the new tokens alone
        expected = torch.cat([forced, expected], 1)
        expected_bos = torch.cat([forced[:, :1], expected_bos], 1)
    ours = {"input_ids": None, **inputs}
    assert generate(model, **ours, decoder_input_ids=forced, max_new_tokens=6).tolist() == expected.tolist()
    got_bos = generate(model, **ours, max_new_tokens=6, forced_bos_token_id=11)
    assert got_bos[:, 1].tolist() == [11, 11, 11] and got_bos.tolist() == expected_bos.tolist()


def test_sampling_is_seeded_and_follows_the_processors(models):
    _, model, _ = models["bart"]
    ids, mask = source().values()  # input_ids, attention_mask
    options = dict(do_sample=True, top_k=5, temperature=0.7, seed=3, max_new_tokens=8)
    a, b = generate(model, ids, mask, **options), generate(model, ids, mask, **options)
    assert a.tolist() == b.tolist() and a.shape[0] == 3 and a.shape[1] <= 9
    assert generate(model, ids, mask, **{**options, "seed": 4}).tolist() != a.tolist()


def test_the_encoder_runs_once_and_cross_keys_are_projected_once(models):
    _, _, model = models["t5"]
    ids, mask = source().values()  # input_ids, attention_mask
    calls = {"encoder": 0, "cross_k": 0}
    model.body.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    layer = model.body.decoder.layers[0].cross_attn
    hooks = [layer.k.register_forward_hook(lambda *_: calls.__setitem__("cross_k", calls["cross_k"] + 1))]
    try:
        steps = list(stream(model, ids, mask, max_new_tokens=5, eos_token_id=None))
        assert len(steps) == 5 and calls == {"encoder": 1, "cross_k": 1}
        calls.update(encoder=0, cross_k=0)
        generate(model, ids, mask, num_beams=3, max_new_tokens=5)
        assert calls == {"encoder": 1, "cross_k": 1}  # the beams share the batch's encoder output
    finally:
        for h in hooks:
            h.remove()
        model.body.encoder._forward_hooks.clear()


def test_generation_options_are_checked(models):
    _, model, _ = models["bart"]
    ids, mask = source().values()  # input_ids, attention_mask
    with pytest.raises(GraftError, match=r"^generation: no_repeat_ngram_size=-1 must be >= 0"):
        GenerationConfig(no_repeat_ngram_size=-1)
    with pytest.raises(
        GraftError, match="^generation: 1 start tokens and 40 new ones are more than the decoder's 40"
    ):
        generate(model, ids, mask, max_new_tokens=40)
    with pytest.raises(GraftError, match="^generation: compile is for decoder-only models"):
        generate(model, ids, mask, compile=True)
