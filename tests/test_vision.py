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


def test_augment_none_is_the_evaluation_preprocessing_and_flip_only_mirrors_it(images):
    evaluation = ImageProcessor(size=(24, 24), crop=(20, 20))
    none = ImageProcessor(size=(24, 24), crop=(20, 20), augment="none")
    torch.manual_seed(0)
    assert torch.equal(none(images, train=True), evaluation(images))
    always = ImageProcessor(size=(24, 24), crop=(20, 20), augment="flip", flip=1.0)
    assert torch.equal(always(images, train=True), evaluation(images).flip(-1))  # resized, cropped, mirrored
    never = ImageProcessor(size=(24, 24), crop=(20, 20), augment="flip", flip=0.0)
    assert torch.equal(never(images, train=True), evaluation(images))


def test_the_random_crop_covers_the_crop_scale_share_of_the_image(monkeypatch):
    boxes = []
    resize = Image.Image.resize

    def spy(self, size, resample=None, box=None, reducing_gap=None):
        boxes.append(box)
        return resize(self, size, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    image = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for scale in ((0.25, 0.36), (0.08, 1.0)):
        boxes.clear()
        processor = ImageProcessor(size=(16, 16), scale=scale, ratio=(1.0, 1.0))
        processor([image] * 40, train=True)
        sides = [right - left for left, _, right, _ in boxes]
        assert [bottom - top for _, top, _, bottom in boxes] == sides  # ratio 1: squares
        assert all(round(100 * scale[0] ** 0.5) <= side <= round(100 * scale[1] ** 0.5) for side in sides)
        if scale == (0.08, 1.0):
            assert min(sides) < 50 < max(sides)  # the default range does reach outside [0.25, 0.36]


def test_bad_augmentation_values_name_the_key():
    with pytest.raises(GraftError) as error:
        ImageProcessor(augment="crop")
    assert str(error.value) == (
        "augment: unknown value 'crop' (one of crop+flip, flip, none); did you mean 'crop+flip'?"
    )
    with pytest.raises(GraftError) as error:
        ImageProcessor(scale=(0.5, 0.2))
    assert str(error.value) == (
        "crop_scale: expected [low, high] with 0 < low <= high <= 1 (shares of the image's area), got [0.5, 0.2]"
    )


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
    listed.write_text(f"image,label\n{tmp_path}/data/bag/0.png,bag\n{tmp_path}/data/nope.png,bag\n")
    assert cli("predict", tmp_path / "model", "-i", listed).error_line() == (
        f"error: {listed}, line 3, column 'image': no such image file {tmp_path}/data/nope.png"
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


@pytest.fixture
def image_run(tmp_path):
    """A tiny ViT, 12 Fashion-MNIST images listed in a CSV with paths relative to the CSV's
    folder, and the train arguments of a one-epoch run on them."""
    hf_model("vit").save_pretrained(tmp_path / "model")
    gray = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "data" / "pics").mkdir(parents=True)
    rows = ["image,label"]
    for i in range(12):
        Image.fromarray(np.array(gray[i])).save(tmp_path / "data" / "pics" / f"{i}.png")
        rows.append(f"pics/{i}.png,{i % 2}")
    (tmp_path / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    recipe = Path(__file__).parents[1] / "recipes" / "classification.yaml"
    return [
        "train", recipe, f"model.path={tmp_path / 'model'}", "task.name=image-classification",
        f"data.train={tmp_path / 'data' / 'train.csv'}", "data.val_fraction=0.25", "data.test_fraction=0",
        "train.epochs=1", "train.batch_size=4", f"train.output={tmp_path / 'run'}", "train.plots=false", "-q",
    ]  # fmt: skip


def test_csv_image_paths_start_from_the_csv_folder_wherever_graft_runs(cli, image_run, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # pics/0.png is not here, but beside train.csv
    cli(*image_run).ok()
    records = list(load_records(tmp_path / "data" / "train.csv"))
    assert records[3]["image"] == str(tmp_path / "data" / "pics" / "3.png")
    absolute = tmp_path / "absolute.jsonl"
    absolute.write_text(json.dumps({"image": records[3]["image"], "label": "1"}) + "\n")
    assert [r["image"] for r in load_records(absolute)] == [records[3]["image"]]  # absolute: as written
    (tmp_path / "data" / "pics" / "5.png").unlink()
    assert cli(*image_run, "--overwrite").error_line() == (
        f"error: {tmp_path / 'data' / 'train.csv'}, line 7, column 'image': no such image file "
        f"{tmp_path / 'data' / 'pics' / '5.png'}; did you mean '9.png'?"
    )


def test_the_recipe_sets_the_training_augmentation(cli, image_run):
    from graft.train.build import build_trainer
    from graft.train.config import load_recipe

    overrides = [str(a) for a in image_run[2:-1]]
    trainer = build_trainer(load_recipe(image_run[1], [*overrides, "data.augment=none"]), quiet=True)
    assert trainer.tokenizer.augment == "none"
    trainer = build_trainer(load_recipe(image_run[1], [*overrides, "data.crop_scale=[0.5, 1.0]"]), quiet=True)
    assert (trainer.tokenizer.augment, trainer.tokenizer.scale) == ("crop+flip", (0.5, 1.0))
    assert build_trainer(load_recipe(image_run[1], overrides), quiet=True).tokenizer.scale == (0.08, 1.0)
    assert cli(*image_run, "data.augment=crop").error_line() == (
        "error: override data.augment=crop: data.augment: unknown value 'crop' (one of crop+flip, flip, none);"
        " did you mean 'crop+flip'?"
    )
    assert cli(*image_run, "data.crop_scale=[0.9, 0.5]").error_line() == (
        "error: override data.crop_scale=[0.9, 0.5]: data.crop_scale: expected [low, high] with low <= high, got [0.9, 0.5]"
    )


def test_augmentation_asked_of_a_text_model_is_refused():
    from graft.tasks.image_text import with_augmentation

    tokenizer = object()  # what a text model loads: anything but an image processor
    assert with_augmentation(tokenizer, "crop+flip", [0.08, 1.0]) is tokenizer  # the defaults: nothing asked
    with pytest.raises(GraftError) as error:
        with_augmentation(tokenizer, "none", [0.08, 1.0])
    assert str(error.value) == (
        "data.augment, data.crop_scale: augmentation is for images, and this model reads text; remove them"
    )
