"""``graft serve`` on image models: an image classifier of every image family (ViT, DeiT) gives
graft predict's predictions for images sent as data URIs; CLIP gives graft zeroshot's against the
request's labels, and its texts' and images' embeddings on /v1/embeddings (``modality``). An image
the server cannot or will not read (a URL, not an image, too many pixels) is a 422 naming it; the
playground classifies a chosen image in a real browser."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_hf_config
from test_clip import clip_folder, write_images
from test_playground import bars
from test_serve import Server

from graft.models import FAMILIES

IMAGE_FAMILIES = sorted(name for name, f in FAMILIES.items() if f.inputs == "patches")
LABELS = ["cat", "dog", "shoe"]


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def classifier_folder(folder, family: str):
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.id2label, cfg.label2id = dict(enumerate(LABELS)), {label: i for i, label in enumerate(LABELS)}
    classes = {"vit": transformers.ViTForImageClassification, "deit": transformers.DeiTForImageClassification}
    classes[family](cfg).save_pretrained(folder)
    return folder


def graft_predict(cli, folder, files, tmp_path) -> list[dict]:
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps({"image": str(f), "id": str(i)}) + "\n" for i, f in enumerate(files)))
    return [json.loads(line) for line in cli("predict", folder, "--input", data).ok().stdout.splitlines()]


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert [(g.get("id"), g["label"]) for g in got] == [(e.get("id"), e["label"]) for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert list(g["scores"]) == list(e["scores"])
        assert np.allclose(list(g["scores"].values()), list(e["scores"].values()), atol=1e-5)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_an_image_classifier_predicts_as_graft_predict(family, tmp_path, cli):
    folder = classifier_folder(tmp_path / family, family)
    files = write_images(tmp_path / "images", 3)
    expected = graft_predict(cli, folder, files, tmp_path)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        c = server.client
        assert c.get("/info").json()["task"] == "image-classification"
        records = [{"image": data_uri(f), "id": str(i)} for i, f in enumerate(files)]
        assert_same_predictions(c.post("/predict", json={"inputs": records}).json()["predictions"], expected)
        bare = base64.b64encode(files[0].read_bytes()).decode()  # base64 without the data URI's head
        unnamed = {k: v for k, v in expected[0].items() if k != "id"}
        assert_same_predictions(c.post("/predict", json={"inputs": bare}).json()["predictions"], [unnamed])

        from PIL import Image

        huge = tmp_path / "huge.png"
        Image.new("1", (6000, 5000)).save(huge)  # 30 million pixels in a few kilobytes
        for image, message in (
            ("https://example.com/cat.png", "inputs[0].image: graft serve fetches no URL"),
            ("data:image/png;base64,bm90IGFuIGltYWdl", "inputs[0].image: cannot read the image"),
            ("%%%", "inputs[0].image: not a data URI or base64 text"),
            (data_uri(huge), "inputs[0].image: 6000 x 5000 pixels; graft reads at most 25,000,000"),
        ):
            error = c.post("/predict", json={"inputs": [image]}).json()["error"]
            assert error["message"].startswith(message) and error["param"] == "inputs"
        error = c.post("/predict", json={"inputs": [{"text": "a cat"}]}).json()["error"]
        assert error["message"] == "inputs[0]: a record needs 'image' (a data URI)"
        error = c.post("/predict", json={"inputs": [data_uri(files[0])], "labels": ["a"]}).json()["error"]
        assert error["param"] == "labels"
        for path, body in (("/tokenize", {"input": "x"}), ("/v1/embeddings", {"input": "x"})):
            assert c.post(path, json=body).status_code == 400
    finally:
        server.close()


def test_clip_classifies_images_against_labels_and_embeds_texts_and_images(tmp_path, cli):
    from graft.loading import load_model, load_processor
    from graft.tasks.image_text import encode_images, encode_texts

    folder = tmp_path / "clip"
    clip_folder(folder)
    files = write_images(tmp_path / "images", 2)
    templates = ["a photo of a {}.", "{}"]
    args = ["--labels", ",".join(LABELS), *(a for t in templates for a in ("--templates", t))]
    expected = [json.loads(line) for line in cli("zeroshot", folder, *args, *files).ok().stdout.splitlines()]
    model, processor = load_model(folder), load_processor(folder)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        c = server.client
        assert c.get("/info").json()["task"] == "zero-shot-image-classification"
        body = {"inputs": [data_uri(f) for f in files], "labels": LABELS, "templates": templates}
        got = c.post("/predict", json=body).json()["predictions"]
        assert_same_predictions(got, [{k: v for k, v in e.items() if k != "image"} for e in expected])

        texts = ["a photo of a cat .", "a red shoe"]
        vectors = c.post("/v1/embeddings", json={"input": texts}).json()["data"]
        assert torch.tensor([v["embedding"] for v in vectors]) == pytest.approx(
            encode_texts(model, processor.tokenizer, texts), abs=1e-5
        )
        images = c.post("/embed", json={"inputs": [data_uri(f) for f in files], "modality": "image"}).json()
        assert torch.tensor(images) == pytest.approx(encode_images(model, processor.images, files), abs=1e-5)

        missing = c.post("/predict", json={"inputs": [data_uri(files[0])]}).json()["error"]
        assert missing["param"] == "labels"
        bad = c.post(
            "/predict", json={"inputs": [data_uri(files[0])], "labels": LABELS, "templates": ["no slot"]}
        )
        assert bad.status_code == 422 and "{}" in bad.json()["error"]["message"]
    finally:
        server.close()


def test_the_playground_classifies_a_chosen_image(tmp_path, cli, page):
    folder = classifier_folder(tmp_path / "vit", "vit")
    files = write_images(tmp_path / "images", 1)
    (expected,) = graft_predict(cli, folder, files, tmp_path)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=image-classification]")
        page.set_input_files("#file", str(files[0]))
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "image.png"))
        shown = bars(page)
    finally:
        server.close()
    assert shown == {label: f"{100 * p:.2f}%" for label, p in expected["scores"].items()}


def test_the_playground_classifies_an_image_against_typed_labels_with_clip(tmp_path, cli, page):
    folder = tmp_path / "clip"
    clip_folder(folder)
    files = write_images(tmp_path / "images", 1)
    line = cli("zeroshot", folder, "--labels", ",".join(LABELS), files[0]).ok().stdout
    expected = json.loads(line)  # graft zeroshot's default templates, as the page sends none
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=zero-shot-image-classification]")
        page.set_input_files("#file", str(files[0]))
        page.fill("#text", "cat, dog\nshoe")
        page.click("#submit")
        page.wait_for_selector("#output[data-ready=true]")
        page.screenshot(path=str(tmp_path / "clip.png"))
        shown = bars(page)
    finally:
        server.close()
    assert shown == {label: f"{100 * p:.2f}%" for label, p in expected["scores"].items()}
