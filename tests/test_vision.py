"""graft.vision: preprocessing equal to transformers' image processors, augmentation, image errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model
from PIL import Image

from graft.data import load_records, read_idx
from graft.errors import GraftError
from graft.loading import load_model
from graft.tasks import TaskModel
from graft.tasks.image import ImageClassificationHead
from graft.vision import ImageProcessor, open_image

TOL = 1e-5
FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist (.ci/run)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Four Fashion-MNIST test images (28 x 28 grayscale) and a generated 37 x 53 colour one."""
    assert FASHION.exists(), "apt-get install -y dataset-fashion-mnist"
    gray = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:4]
    colour = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return [Image.fromarray(np.array(g)) for g in gray] + [Image.fromarray(colour)]


# transformers' processors (their Pillow backend: PyPI's torchvision does not run with this torch)
PROCESSORS = {
    "vit": lambda: transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}),
    "clip-small": lambda: transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    ),
    "clip": lambda: transformers.CLIPImageProcessorPil(),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_preprocessing_equals_transformers(name, images, tmp_path):
    reference = PROCESSORS[name]()
    reference.save_pretrained(tmp_path)  # graft reads what the checkpoint holds
    processor = ImageProcessor.from_dict(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    for image in images:
        expected = reference(images=image.convert("RGB"), return_tensors="np")["pixel_values"]
        got = processor([image])  # a grayscale image is converted to RGB as the model needs
        assert got.shape == expected.shape
        assert (got - torch.from_numpy(expected)).abs().max() <= TOL


def test_without_a_preprocessor_config_the_model_size_and_vit_defaults_apply(tmp_path):
    hf_model("vit").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base")
    processor = ImageProcessor.for_model(tmp_path, model.config)
    assert processor.size == (30, 30) and processor.mean == (0.5, 0.5, 0.5)
    reference = transformers.ViTImageProcessorPil(size={"height": 30, "width": 30})
    image = Image.fromarray(np.full((7, 9, 3), 200, dtype=np.uint8))
    expected = torch.from_numpy(reference(images=image, return_tensors="np")["pixel_values"])
    assert (processor([image]) - expected).abs().max() <= TOL


def test_grayscale_to_an_rgb_model_is_converted_and_said_once(images, caplog):
    processor = ImageProcessor(size=(28, 28))
    with caplog.at_level(logging.WARNING, logger="graft"):
        pixels = processor(images[:4], [f"shirt-{i}.png" for i in range(4)])
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        "note: grayscale images are converted to RGB for this 3-channel model (first: shirt-0.png)"
    ]
    assert pixels.shape == (4, 3, 28, 28) and torch.equal(pixels[:, 0], pixels[:, 2])


def test_unreadable_and_truncated_images_name_the_file(tmp_path, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(GraftError, match=f"^{broken}: cannot read the image"):
        ImageProcessor()([str(broken)])
    whole = tmp_path / "whole.png"
    images[4].save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(GraftError, match=f"^{truncated}: cannot read the image \\(.*truncated"):
        open_image(str(truncated))
    with pytest.raises(GraftError, match="missing.png: no such file or folder"):
        open_image(str(tmp_path / "missing.png"))


def test_a_wrong_size_is_refused_when_the_config_says_do_not_resize(images):
    processor = ImageProcessor.from_dict(
        {"do_resize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "m/preprocessor_config.json",
        3,
        30,
    )
    with pytest.raises(GraftError) as error:
        processor([images[0]], ["shirt.png"])
    assert str(error.value) == (
        "shirt.png: the image is 28x28 pixels but the model takes 30x30, and m/preprocessor_config.json says"
        " do_resize: false (resize the images, or set do_resize: true there)"
    )


def test_bad_preprocessor_values_name_the_key():
    with pytest.raises(GraftError, match="^p.json: image_std must be 3 numbers \\(one per channel\\)"):
        ImageProcessor.from_dict({"image_std": [0.5, 0.5]}, "p.json")
    with pytest.raises(GraftError, match="^p.json: size must be a positive int"):
        ImageProcessor.from_dict({"size": {"height": -1}}, "p.json")


def test_augmentation_crops_and_flips_reproducibly_and_only_in_training(images):
    processor = ImageProcessor(size=(24, 24), scale=(0.5, 1.0))
    torch.manual_seed(0)
    first = processor(images, train=True)
    torch.manual_seed(0)
    again = processor(images, train=True)
    assert first.shape == (5, 3, 24, 24) and torch.equal(first, again)  # torch's seed decides the crops
    assert not torch.equal(first, processor(images, train=True))
    assert torch.equal(processor(images), processor(images))  # evaluation: no randomness
    full = ImageProcessor(size=(24, 24), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    flipped = full([images[4].resize((24, 24))], train=True)
    assert torch.equal(flipped, processor([images[4].resize((24, 24))]).flip(-1))  # the whole image, mirrored


def test_image_classifier_collates_fashion_mnist_idx_records(tmp_path):
    hf_model("vit").save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base")
    labels = [str(i) for i in range(10)]
    model = TaskModel(body, ImageClassificationHead(body, id2label=labels))
    records = list(load_records(FASHION / "t10k-images-idx3-ubyte.gz"))[:6]
    processor = ImageProcessor.for_model(tmp_path, body.config)
    model.eval()
    batch = model.head.collate(records, processor)
    assert batch["pixel_values"].shape == (6, 3, 30, 30)
    assert batch["labels"].tolist() == [int(r["label"]) for r in records]
    out = model(**batch)
    assert out.logits.shape == (6, 10) and out.loss is not None
    with pytest.raises(GraftError, match="^record 1: no 'image', which the image-classification task needs"):
        model.head.collate([{"text": "a shirt"}], processor)


def test_predict_and_eval_read_image_folders_and_csv_paths(cli, tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=30,
        patch_size=10, id2label={0: "bag", 1: "shirt"}, label2id={"bag": 0, "shirt": 1},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "model")
    gray = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:4]
    for i, label in enumerate(["bag", "bag", "shirt", "shirt"]):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.array(gray[i])).save(tmp_path / "data" / label / f"{i}.png")
    rows = cli("predict", tmp_path / "model", "-i", tmp_path / "data").ok().stdout.splitlines()
    assert [json.loads(r)["id"] for r in rows] == ["bag/0.png", "bag/1.png", "shirt/2.png", "shirt/3.png"]
    metrics = json.loads(cli("eval", tmp_path / "model", "-d", tmp_path / "data").ok().stdout)
    assert metrics["examples"] == 4 and metrics["confusion_matrix"]["labels"] == ["bag", "shirt"]
    listed = tmp_path / "list.csv"
    listed.write_text(f"image,label\n{tmp_path}/data/nope.png,bag\n")
    assert cli("predict", tmp_path / "model", "-i", listed).error_line() == (
        f"error: {tmp_path}/data/nope.png: no such file or folder"
    )


def test_train_fine_tunes_an_image_classifier_and_saves_its_preprocessing(cli, tmp_path):
    hf_model("vit").save_pretrained(tmp_path / "model")
    gray = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    for split, rows in (("train", range(0, 40)), ("val", range(40, 50))):
        for i in rows:
            folder = tmp_path / split / str(labels[i] % 2)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array(gray[i])).save(folder / f"{i}.png")
    recipe = Path(__file__).parents[1] / "recipes" / "classification.yaml"
    cli(
        "train", recipe, f"model.path={tmp_path / 'model'}", "task.name=image-classification",
        f"data.train={tmp_path / 'train'}", f"data.validation={tmp_path / 'val'}", "data.test_fraction=0",
        "train.epochs=1", "train.batch_size=8", f"train.output={tmp_path / 'run'}", "train.plots=false", "-q",
    ).ok()  # fmt: skip
    saved = tmp_path / "run" / "model"
    assert ImageProcessor.for_model(saved, load_model(saved).config).size == (30, 30)
    assert transformers.AutoModelForImageClassification.from_pretrained(saved).config.id2label == {
        0: "0",
        1: "1",
    }
