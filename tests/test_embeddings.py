"""Input embeddings of every kind (graft.nn.embeddings): image patches against transformers' ViT
and CLIP, audio frames against Whisper's encoder, and each one's shapes and gradients in a stack."""

from __future__ import annotations

import pytest
import torch

from graft import kernels
from graft.nn import AudioFrameEmbeddings, PatchEmbeddings, Transformer, TransformerConfig
from graft.nn.config import INPUTS
from graft.nn.positions import timing_signal
from graft.nn.transformer import EMBEDDINGS

STACK = dict(
    family="tiny", vocab_size=1, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
    prenorm=True, final_norm=True, dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
# TransformerConfig.inputs -> a tiny stack reading them, and a batch of its inputs
CASES = {
    "tokens": (dict(max_positions=16), {"input_ids": torch.randint(0, 1, (2, 5))}, 5),
    "patches": (
        dict(inputs="patches", image_size=16, patch_size=4, max_positions=17),
        {"pixel_values": torch.randn(2, 3, 16, 16)},
        17,  # 16 patches and [CLS]
    ),
    "audio_frames": (
        dict(inputs="audio_frames", position="sinusoidal", num_mel_bins=8, max_positions=6),
        {"input_features": torch.randn(2, 8, 11)},
        6,  # 11 frames, halved by the second convolution (rounding up)
    ),
}
MODES = pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])


def test_every_kind_of_input_has_embeddings_and_a_case():
    assert set(EMBEDDINGS) == set(INPUTS) == set(CASES)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("embedding_norm", [False, True], ids=["", "norm"])
def test_a_stack_over_each_kind_of_input_has_its_shape_and_gradients(kind, embedding_norm):
    """The stack reads its inputs by Hugging Face's keyword and gives (B, T, H); the loss's gradient
    reaches every embedding weight (fixed sinusoids are a buffer, not trained)."""
    options, inputs, length = CASES[kind]
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**STACK, **options, embedding_norm=embedding_norm))
    out = model(**inputs).last_hidden_state
    assert out.shape == (2, length, 32)
    out.pow(2).sum().backward()
    for name, p in model.embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kind == "audio_frames":
        assert "positions" in model.embed.state_dict() and not model.embed.positions.requires_grad


# ---- image patches: ViT and CLIP ----------------------------------------------------------


def vit() -> tuple[torch.nn.Module, Transformer]:
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
        patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    ref = tr.ViTModel(hf).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = TransformerConfig(
        **{**STACK, "family": "vit"}, inputs="patches", image_size=16, patch_size=4, max_positions=17,
        pooler=True, norm_eps=1e-12,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    state = ref.state_dict()
    ours = {
        "embed.cls": state["embeddings.cls_token"].view(-1),  # (1, 1, H) -> (H,)
        "embed.positions.weight": state["embeddings.position_embeddings"][0],  # (1, N + 1, H) -> (N + 1, H)
        "embed.patches.weight": state["embeddings.patch_embeddings.projection.weight"],
        "embed.patches.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
        "pooler.weight": state["pooler.dense.weight"],
        "pooler.bias": state["pooler.dense.bias"],
    }
    for i in range(2):
        parts = {f"attn.{a}": f"attention.{a}_proj" for a in "qkvo"}
        parts |= {"attn_norm": "layernorm_before", "ffn_norm": "layernorm_after"}
        parts |= {"ffn.up": "mlp.fc1", "ffn.down": "mlp.fc2"}
        for a, b in parts.items():
            for t in ("weight", "bias"):
                ours[f"layers.{i}.{a}.{t}"] = state[f"layers.{i}.{b}.{t}"]
    assert set(ours) == set(model.state_dict())  # every tensor comes from ViT
    model.load_state_dict(ours)
    return ref, model


def test_patch_embeddings_equal_vit_embeddings():
    ref, model = vit()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref.embeddings(pixels)  # (B, 17, H)
        got = model.embed(pixels, torch.arange(17).expand(2, -1))
    assert expected.shape == got.shape == (2, 17, 32)
    assert (got - expected).abs().max() <= 1e-5


@MODES
def test_a_stack_over_patches_matches_vit_model(use_kernels):
    """inputs="patches" and nothing else special: transformers' ViTModel, last hidden state and pooler."""
    ref, model = vit()
    if use_kernels:
        kernels.optimize(model)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref(pixel_values=pixels)
        got = model(pixel_values=pixels)
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-5
    assert (got.pooled - expected.pooler_output).abs().max() <= 1e-5


def test_patch_embeddings_without_bias_and_with_a_norm_equal_clip_vision():
    """CLIP's vision tower: a patch projection without bias, and a LayerNorm (pre_layrnorm) on the
    embeddings before the first block: patch_bias=False, embedding_norm=True."""
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
        patch_size=4,
    )  # fmt: skip
    ref = tr.CLIPVisionModel(hf).eval()
    with torch.no_grad():
        ref.pre_layrnorm.bias.add_(torch.randn(32) * 0.1)
    cfg = TransformerConfig(
        **{**STACK, "family": "clip"}, inputs="patches", image_size=16, patch_size=4, max_positions=17,
        patch_bias=False, embedding_norm=True, norm_eps=1e-5,
    )  # fmt: skip
    embed = PatchEmbeddings(cfg).eval()
    state = ref.state_dict()
    names = {
        "cls": "embeddings.class_embedding",
        "patches.weight": "embeddings.patch_embedding.weight",
        "positions.weight": "embeddings.position_embedding.weight",
        "norm.weight": "pre_layrnorm.weight",
        "norm.bias": "pre_layrnorm.bias",
    }
    assert set(names) == set(embed.state_dict())
    embed.load_state_dict({k: state[v] for k, v in names.items()})
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref.pre_layrnorm(ref.embeddings(pixels))
        got = embed(pixels, torch.arange(17).expand(2, -1))
    assert (got - expected).abs().max() <= 1e-5


# ---- audio frames: Whisper ----------------------------------------------------------------


def test_timing_signal_equals_whisper_sinusoids():
    from transformers.models.whisper.modeling_whisper import sinusoids

    assert torch.equal(timing_signal(1500, 64), sinusoids(1500, 64))


def test_audio_frame_embeddings_equal_what_whisper_encoder_feeds_its_first_layer():
    import transformers as tr
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    hf = tr.WhisperConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=16, num_mel_bins=8,
        max_source_positions=6, dropout=0.0,
    )  # fmt: skip
    ref = WhisperEncoder(hf).eval()
    cfg = TransformerConfig(
        **{**STACK, "family": "whisper"}, inputs="audio_frames", position="sinusoidal", num_mel_bins=8,
        max_positions=6,
    )  # fmt: skip
    embed = AudioFrameEmbeddings(cfg).eval()
    state = ref.state_dict()
    names = {f"conv{i}.{t}": f"conv{i}.{t}" for i in (1, 2) for t in ("weight", "bias")}
    names["positions"] = "embed_positions.weight"
    assert set(names) == set(embed.state_dict())
    assert torch.equal(state["embed_positions.weight"], embed.positions)  # the same sinusoids
    embed.load_state_dict({k: state[v] for k, v in names.items()})
    seen = []
    ref.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    features = torch.randn(2, 8, 12)  # Whisper wants exactly 2 * max_source_positions frames
    with torch.no_grad():
        ref(features)
        got = embed(features, torch.arange(6).expand(2, -1))
    assert seen[0].shape == got.shape == (2, 6, 32)
    assert (got - seen[0]).abs().max() <= 1e-5
