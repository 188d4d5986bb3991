"""CLIP exported as a text graph and an image graph (and, for the image-text task, the graph of
their similarity logits): each within 1e-4 of graft on shapes not traced; graft embed on the
exported folder gives graft's vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_clip import clip_folder

from graft.export import MANIFEST, export_model
from graft.export.graph import TowerGraph, example_inputs
from graft.export.runtime import Exported
from graft.loading import load_model
from graft.tasks.image_text import similarity

TOL = 1e-4


@pytest.mark.parametrize("task", ["base", "image-text"])
def test_clip_towers_and_logits_export_with_parity(task, tmp_path):
    clip_folder(tmp_path / "clip")
    model = load_model(tmp_path / "clip", task=task)
    manifest = export_model(model, tmp_path / "out")
    graphs = {"text", "image"} | ({"logits"} if task == "image-text" else set())
    assert set(manifest["graphs"]) == graphs and manifest["parity"]["max_abs_diff"] <= TOL
    body = model if task == "base" else model.body
    texts = example_inputs(TowerGraph(model, "text"), 4, 13, seed=7)  # 4 texts of 13 tokens, 3 padded
    images = example_inputs(TowerGraph(model, "image"), 5, 13, seed=7)["pixel_values"]  # (5, C, H, W)
    with torch.no_grad():
        text, image = body.encode_text(**texts), body.encode_image(images)
    exported = Exported(tmp_path / "out")
    numpy = {k: v.numpy() for k, v in texts.items()}
    assert np.abs(exported.run(numpy, "text")[0] - text.numpy()).max() <= TOL
    assert np.abs(exported.run({"pixel_values": images.numpy()}, "image")[0] - image.numpy()).max() <= TOL
    if task == "image-text":
        logits = exported.run({"pixel_values": images.numpy(), **numpy}, "logits")[0]  # (5, 4)
        expected = similarity(image, text, body.logit_scale).detach().numpy()
        assert logits.shape == (5, 4) and np.abs(logits - expected).max() <= TOL


def test_embed_on_an_exported_clip_folder_equals_the_model_folder(tmp_path, cli):
    clip_folder(tmp_path / "clip")
    cli("export", tmp_path / "clip", tmp_path / "out").ok()
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["family"] == "clip"
    args = ["--text", "a red car", "--text", "a cat on a mat", "--normalize"]
    want = [json.loads(line) for line in cli("embed", tmp_path / "clip", *args).ok().stdout.splitlines()]
    got = [json.loads(line) for line in cli("embed", tmp_path / "out", *args).ok().stdout.splitlines()]
    assert len(got) == 2 and np.abs(np.array(got) - np.array(want)).max() <= 1e-5
    assert cli("embed", tmp_path / "out", "--image", tmp_path / "clip").error_line() == (
        f"error: embed --image: {tmp_path / 'out'} is an exported folder; give the CLIP model folder"
    )
