"""ViT and DeiT match transformers (bodies, image classifiers, other image sizes), save in HF layout,
and take every strategy."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import hf_model, tiny_hf_config

from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.nn import Transformer
from graft.strategies import STRATEGIES, apply_strategy, parse_strategy
from graft.tasks import HEADS, TaskModel

TOL = 1e-5
IMAGE_FAMILIES = sorted(name for name, f in FAMILIES.items() if f.inputs == "patches")
IMAGE_HEADS = sorted(task for task, head in HEADS.items() if head.inputs == "patches")
LABELS = ["shirt", "sneaker", "bag"]


@pytest.fixture(params=IMAGE_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["reference", "kernels"])
def kernels(request) -> bool:
    return request.param


def pixels(height: int = 30, width: int = 30, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def hf_classifier(family: str):
    torch.manual_seed(0)
    config = tiny_hf_config(family)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    cls = getattr(transformers, FAMILIES[family].architectures["image-classification"])
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_image_families_and_heads_are_registered():
    assert {"vit", "deit"} <= set(IMAGE_FAMILIES) and IMAGE_HEADS == ["image-classification"]


def test_body_and_pooler_match_transformers(family, tmp_path, kernels):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=kernels)
    assert isinstance(model, Transformer) and model.config.inputs == "patches"
    x = pixels()
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True)
        got = model(pixel_values=x, output_hidden_states=True)
    assert expected.last_hidden_state.abs().max() > 0.1
    assert (expected.last_hidden_state - got.last_hidden_state).abs().max() <= TOL
    assert (expected.pooler_output - got.pooled).abs().max() <= TOL
    assert len(got.hidden_states) == len(expected.hidden_states)
    for e, g in zip(expected.hidden_states[:-1], got.hidden_states[:-1], strict=True):
        assert (e - g).abs().max() <= TOL


@pytest.mark.parametrize(("height", "width"), [(40, 40), (20, 50)])
def test_other_image_sizes_interpolate_positions_as_transformers(family, height, width, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=False)
    x = pixels(height, width)
    with torch.no_grad():
        expected = ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = model(pixel_values=x).last_hidden_state
    prefix = model.config.prefix_tokens
    assert got.shape[1] == prefix + (height // 10) * (width // 10)
    assert (expected - got).abs().max() <= TOL


def test_image_classifier_round_trips_through_transformers(family, tmp_path, kernels):
    ref = hf_classifier(family)
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", kernels=kernels)
    assert isinstance(model, TaskModel) and model.task == "image-classification"
    assert model.head.id2label == LABELS
    x, labels = pixels(), torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = ref(pixel_values=x, labels=labels)
        got = model(pixel_values=x, labels=labels)
    assert (expected.logits - got.logits).abs().max() <= TOL
    assert abs(expected.loss.item() - got.loss.item()) <= TOL
    save_model(model, tmp_path / "graft")
    again = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "graft").eval()
    assert again.config.id2label == ref.config.id2label
    with torch.no_grad():
        assert (again(pixel_values=x).logits - expected.logits).abs().max() <= TOL


def test_mean_pooling_reads_the_patches_only(tmp_path):
    hf_classifier("deit").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=False, pooling="mean")
    x = pixels()
    with torch.no_grad():
        hidden = model.body(pixel_values=x).last_hidden_state  # (B, 2 + 9, H)
        expected = model.head.out(hidden[:, 2:].mean(1))
        assert (model(pixel_values=x).logits - expected).abs().max() <= TOL
    save_model(model, tmp_path / "saved")
    assert load_model(tmp_path / "saved").head.pooling == "mean"


def test_text_heads_on_image_models_and_image_heads_on_text_models_are_one_line_errors(tmp_path):
    hf_model("vit").save_pretrained(tmp_path / "vit")
    with pytest.raises(GraftError, match="^a vit model has no classification head"):
        load_model(tmp_path / "vit", task="classification")
    hf_model("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(GraftError, match="^image-classification: a bert model reads tokens, not images"):
        load_model(tmp_path / "bert", task="image-classification")


def test_a_config_with_the_wrong_position_count_is_refused(tmp_path):
    hf_model("vit").save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"image_size": 30', '"image_size": 40')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(GraftError, match="embeddings.position_embeddings' has shape \\(10, 32\\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("spec", sorted(STRATEGIES))
def test_every_strategy_trains_an_image_classifier(spec, tmp_path):
    """Each strategy applies to ViT (LoRA on its attention, BitFit, features...), a step changes what
    it trains and leaves every other parameter bitwise equal."""
    hf_classifier("vit").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=False)
    name = parse_strategy(spec).name
    if name == "prompt":  # learned token embeddings: an image model has none
        with pytest.raises(GraftError, match="^strategy 'prompt': a vit model reads patches, not tokens"):
            apply_strategy(model, spec)
        return
    model = apply_strategy(model, spec).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(before) or name == "full"
    if name == "lora":
        assert any(".attn.q.lora_" in n for n in trained)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = {"pixel_values": pixels(), "labels": torch.tensor([0, 1, 2])}
    for _ in range(2):  # LoRA's up projection starts at zero: the second step moves its down one
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n not in trained:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trained)
