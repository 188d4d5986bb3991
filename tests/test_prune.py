"""Pruning: heads and feed-forward neurons cut out equal them masked, for every family that has
one key/value head per query head; counts survive save/load (and transformers' pruned_heads);
unstructured sparsity by magnitude and movement; head importance of a silenced head is zero."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from conftest import padded_batch, stack_families, tiny_hf_config

from graft.compress.prune import (
    least_important,
    movement_scores,
    prune,
    remove,
    sparsify,
    sparsity_report,
)
from graft.errors import GraftError
from graft.interpret.heads import heatmap_png, importance, masking_curve, masks
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.tasks import TaskModel

TOL = 1e-5
LABELS = ["a", "b", "c"]
HEADS_TO_CUT = {0: [1, 3], 1: [0]}  # of 4 heads per layer (tiny_hf_config)
NEURONS_TO_CUT = {0: [0, 5, 7], 1: [2]}

# one stack of blocks; the two-stack families (encoder-decoders, CLIP) are refused in one line: below
ONE_STACK, TWO_STACKS = stack_families()


def grouped(family: str) -> bool:
    cfg = tiny_hf_config(family)
    kv = getattr(cfg, "num_key_value_heads", None)
    return kv is not None and kv != cfg.num_attention_heads


def images(family: str) -> bool:
    return FAMILIES[family].inputs == "patches"


def tiny_classifier(family: str, folder, kernels: bool = True) -> TaskModel:
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    if not images(family) and cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    transformers.AutoModel.from_config(cfg).save_pretrained(folder)
    task = "image-classification" if images(family) else "classification"
    model = load_model(folder, task=task, id2label=LABELS, kernels=kernels)
    with torch.no_grad():  # random, non-trivial biases so that a removed head's bias matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(labels: bool = True, family: str = "bert") -> dict:
    if images(family):  # three random images at the tiny model's size
        cfg = tiny_hf_config(family)
        torch.manual_seed(1)
        out = {"pixel_values": torch.randn(3, cfg.num_channels, cfg.image_size, cfg.image_size)}
    else:
        ids, mask = padded_batch()
        out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = torch.tensor([0, 2, 1])
    return out


def logits(model: TaskModel, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def removed_parameters(model: TaskModel, heads: dict, neurons: dict) -> int:
    cfg = model.body.config
    h, hd = cfg.hidden_size, cfg.head_dim
    per_head = 3 * (h * hd + (hd if cfg.qkv_bias else 0)) + hd * h
    per_neuron = (2 + cfg.gated) * h + (1 + cfg.gated) * cfg.mlp_bias
    return sum(map(len, heads.values())) * per_head + sum(map(len, neurons.values())) * per_neuron


@pytest.mark.parametrize("family", ONE_STACK)
def test_pruned_model_equals_the_masked_one_and_is_smaller(family, tmp_path):
    model = tiny_classifier(family, tmp_path / "base")
    heads = {} if grouped(family) else HEADS_TO_CUT
    b = batch(labels=False, family=family)
    with masks(model) as (head_masks, neuron_masks), torch.no_grad():
        for i, cut in heads.items():
            head_masks[i][cut] = 0.0
        for i, cut in NEURONS_TO_CUT.items():
            neuron_masks[i][cut] = 0.0
        masked = logits(model, b)
    before = sum(p.numel() for p in model.parameters())
    remove(model, heads, NEURONS_TO_CUT)
    assert (logits(model, b) - masked).abs().max() <= TOL
    after = sum(p.numel() for p in model.parameters())
    assert before - after == removed_parameters(model, heads, NEURONS_TO_CUT)

    save_model(model, tmp_path / "pruned")  # per-block counts survive save and load
    again = load_model(tmp_path / "pruned")
    cfg = again.body.config
    assert cfg.heads_per_layer == model.body.config.heads_per_layer
    assert cfg.intermediate_sizes == [
        cfg.intermediate_size - len(NEURONS_TO_CUT.get(i, [])) for i in range(cfg.num_blocks)
    ]
    assert (logits(again, b) - masked).abs().max() <= TOL


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if grouped(f)))
def test_removing_heads_of_a_grouped_query_model_is_one_line(family, tmp_path):
    model = tiny_classifier(family, tmp_path)
    with pytest.raises(GraftError, match=r"^prune: .*grouped-query attention.*--heads 0"):
        remove(model, {0: [1]})


def test_pruning_more_heads_than_a_layer_has_is_one_line(tmp_path):
    model = tiny_classifier("bert", tmp_path)
    with pytest.raises(
        GraftError, match=r"^prune: layer 0 has 4 heads; cannot remove 5 \(heads \[0, 1, 2, 3, 4\]\)"
    ):
        remove(model, {0: [0, 1, 2, 3, 4]})
    with pytest.raises(GraftError, match="^prune: layer 1 has 4 heads; cannot remove 4"):
        remove(model, {1: [0, 1, 2, 3]})


def test_a_checkpoint_with_transformers_pruned_heads_loads_smaller_and_equal(tmp_path):
    """transformers 4's prune_heads wrote ``pruned_heads`` and smaller tensors (transformers 5
    dropped head pruning): such a folder, made here by hand, loads and equals the masked model."""
    import json

    from safetensors.torch import load_file, save_file

    model = tiny_classifier("bert", tmp_path / "base", kernels=False)
    save_model(model, tmp_path / "full")
    b = batch(labels=False)
    with masks(model) as (head_masks, _), torch.no_grad():
        head_masks[1][[0, 2]] = 0.0
        masked = logits(model, b)
    hd, keep = model.body.config.head_dim, [1, 3]
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    state = load_file(tmp_path / "full" / "model.safetensors")
    prefix = "bert.encoder.layer.1.attention."
    for name in ("self.query", "self.key", "self.value"):
        state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][cols].contiguous()
        state[f"{prefix}{name}.bias"] = state[f"{prefix}{name}.bias"][cols].contiguous()
    state[f"{prefix}output.dense.weight"] = state[f"{prefix}output.dense.weight"][:, cols].contiguous()
    save_file(state, tmp_path / "full" / "model.safetensors")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps({**config, "pruned_heads": {"1": [0, 2]}}))
    again = load_model(tmp_path / "full")
    assert again.body.config.heads_per_layer == [4, 2]
    assert (logits(again, b) - masked).abs().max() <= TOL
    save_model(again, tmp_path / "again")  # written back as it was read
    assert json.loads((tmp_path / "again" / "config.json").read_text())["pruned_heads"] == {"1": [0, 2]}


def test_a_bad_pruned_heads_key_is_one_line(tmp_path):
    import json

    tiny_classifier("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pruned_heads"] = {"0": [0, 1, 2, 3]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        GraftError, match=r"config.json: pruned_heads\['0'\] must list distinct heads from 0 to 3"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ONE_STACK)
def test_a_head_silenced_in_the_weights_has_importance_zero(family, tmp_path):
    model = tiny_classifier(family, tmp_path)
    attn = model.body.layers[1].attn
    hd = attn.head_dim
    with torch.no_grad():  # head 2 of layer 1 writes nothing: its output projection columns are zero
        attn.o.weight[:, 2 * hd : 3 * hd] = 0.0
    scores = importance(model, [batch(family=family), batch(family=family)])
    assert scores.heads[1][2] == 0.0
    assert all(float(s.min()) > 0 for i, s in enumerate(scores.heads) if i != 1)
    assert (scores.heads[1] > 0).sum() == 3


def test_importance_picks_what_prune_removes_and_the_curve_and_heat_map(tmp_path):
    model = tiny_classifier("bert", tmp_path / "m")
    data = [batch(), batch()]
    scores = importance(model, data)
    lowest = scores.table().flatten().argsort()[:2].tolist()  # 2 of 8 heads; each layer keeps some
    expected: dict[int, list[int]] = {}
    for k in lowest:
        expected.setdefault(k // 4, []).append(k % 4)
    assert least_important(scores.heads, 0.25) == expected
    pruned, report = prune(model, data, heads=0.25, ffn=0.25, scores=scores)
    assert report["heads_removed"] == 2 and sum(report["heads_per_layer"]) == 6
    cut_heads = {0: [None] * report["heads_removed"]}  # (counts are what the parameters depend on)
    cut_neurons = {0: [None] * report["neurons_removed"]}
    assert report["neurons_removed"] == int(0.25 * 2 * 37)
    assert report["parameters_before"] - report["parameters_after"] == removed_parameters(
        pruned, cut_heads, cut_neurons
    )
    rows = masking_curve(pruned, data, importance(pruned, data), fractions=(0.0, 0.5))
    assert rows[0]["importance/loss"] == rows[0]["random/loss"]  # nothing masked: the same model
    assert set(rows[1]) >= {"importance/accuracy", "random/accuracy"}
    png = heatmap_png(scores, tmp_path / "heads.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bare_model_or_unlabelled_data_has_no_importance(tmp_path):
    model = tiny_classifier("bert", tmp_path)
    with pytest.raises(GraftError, match="^head importance needs a task model"):
        importance(model.body, [batch()])
    with pytest.raises(GraftError, match="^head importance needs labelled data"):
        importance(model, [batch(labels=False)])


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_unstructured_sparsity_zeroes_the_fraction_asked_and_reports_it(method, tmp_path):
    model = tiny_classifier("bert", tmp_path)
    scores = movement_scores(model, [batch()] * 2) if method == "movement" else None
    kept = sparsify(model, 0.5, method, scores)
    report = sparsity_report(model)
    for name, mask in kept.items():  # half of each matrix, and exactly the masked weights are zero
        assert int((~mask).sum()) == mask.numel() // 2
        assert report["layers"][name] >= 0.5
    assert 0.5 <= report["block_weights_sparsity"] < 0.51
    if method == "magnitude":  # the smallest weights went
        original = tiny_classifier("bert", tmp_path).body.layers[0].attn.q.weight.detach()
        mask = kept["body.layers.0.attn.q"]
        assert float(original[~mask].abs().max()) <= float(original[mask].abs().min())
    with pytest.raises(GraftError, match="^prune: method 'size' is not one of magnitude, movement"):
        sparsify(model, 0.5, "size")


def test_a_fraction_that_would_empty_a_layer_is_one_line(tmp_path):
    model = tiny_classifier("bert", tmp_path)
    with pytest.raises(
        GraftError,
        match=r"^prune: --heads 0.9 asks for 7 of 8 heads, but each of the 2 layers keeps at least one \(6 at most\)$",
    ):
        prune(model, [batch()], heads=0.9)


@pytest.mark.parametrize("family", [f for f in TWO_STACKS if not FAMILIES[f].dual_encoder])  # CLIP: test_clip
def test_a_model_with_two_stacks_is_refused_in_one_line(family, tmp_path):
    from conftest import hf_model

    hf_model(family).save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base")  # an encoder and a decoder
    message = (
        rf"^prune: a {family} model has two stacks \(an encoder and a decoder\); prune works on one stack$"
    )
    with pytest.raises(GraftError, match=message):
        remove(body, {0: [1]})


def test_layer_scope_takes_the_same_share_of_each_layer_and_equals_the_masked_model(tmp_path):
    model = tiny_classifier("bert", tmp_path)
    data = [batch(), batch()]
    scores = importance(model, data)
    b = batch(labels=False)
    # each layer's own lowest: 2 of its 4 heads, 9 of its 37 neurons (floor of 0.25 * 37)
    lowest = lambda s, k: sorted(torch.argsort(s, stable=True)[:k].tolist())  # noqa: E731
    heads = {i: lowest(s, 2) for i, s in enumerate(scores.heads)}
    neurons = {i: lowest(s, 9) for i, s in enumerate(scores.neurons)}
    assert least_important(scores.heads, 0.5, scope="layer") == heads
    assert least_important(scores.neurons, 0.25, "ffn", scope="layer") == neurons
    assert least_important(scores.heads, 0.99, scope="layer") == {
        i: lowest(s, 3) for i, s in enumerate(scores.heads)
    }
    with masks(model) as (head_masks, neuron_masks), torch.no_grad():
        for i in range(2):
            head_masks[i][heads[i]] = 0.0
            neuron_masks[i][neurons[i]] = 0.0
        masked = logits(model, b)
    pruned, report = prune(model, data, heads=0.5, ffn=0.25, scores=scores, scope="layer")
    assert report["scope"] == "layer"
    assert report["heads_per_layer"] == [2, 2] and report["intermediate_sizes"] == [28, 28]
    assert (logits(pruned, b) - masked).abs().max() <= TOL


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("local", "prune: --scope local: not one of global, layer; did you mean 'layer'?"),
        ("globl", "prune: --scope globl: not one of global, layer; did you mean 'global'?"),
    ],
)
def test_an_unknown_scope_is_one_line(scope, message, tmp_path):
    model = tiny_classifier("bert", tmp_path)
    with pytest.raises(GraftError, match=f"^{re.escape(message)}$"):
        prune(model, [batch()], heads=0.25, scope=scope)
