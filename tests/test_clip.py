"""CLIP matches transformers (text and image embeddings, logits, loss, zero-shot), saves in HF
layout, trains contrastively, and serves graft embed / index / search / zeroshot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model

from graft.errors import GraftError
from graft.loading import load_model, load_processor, save_model
from graft.models import FAMILIES
from graft.nn import DualEncoder
from graft.tasks import HEADS, TaskModel
from graft.tasks.image_text import encode_images, encode_texts, similarity
from graft.tasks.zeroshot import label_embeddings, zero_shot_images
from graft.vision import ImageProcessor

TOL = 1e-5
DUAL = sorted(name for name, f in FAMILIES.items() if f.dual_encoder)
WORDS = "a photo of the red green blue car cat dog shoe bag sneaker shirt picture drawing . , an".split()
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


@pytest.fixture(params=[False, True], ids=["reference", "kernels"])
def kernels(request) -> bool:
    return request.param


def tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny model's 99 ids: <pad> 0, words, <|endoftext|> 98."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab.update({"<|startoftext|>": 97, "<|endoftext|>": 98})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 97), ("<|endoftext|>", 98)],
    )
    tok.save(str(folder / "tokenizer.json"))
    special = {
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 20}))


def clip_folder(folder: Path, eos_token_id: int = 98) -> transformers.CLIPModel:
    """The tiny random CLIPModel saved with a tokenizer and CLIP's image preprocessing."""
    ref = hf_model("clip")
    ref.config.text_config.eos_token_id = eos_token_id
    ref.text_model.eos_token_id = eos_token_id
    ref.save_pretrained(folder)
    tiny_tokenizer(folder)
    ImageProcessor(size=None, shortest_edge=30, resample=3, crop=(30, 30), mean=CLIP_MEAN, std=CLIP_STD).save(
        folder
    )
    return ref


def texts_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 9) ids < 98 ending in the end-of-text id 98, right-padded with 0: 9, 6 and 2 real tokens."""
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    for row, n in ((0, 9), (1, 6), (2, 2)):
        ids[row, n - 1] = 98
        ids[row, n:] = 0
        mask[row, n:] = 0
    return ids, mask


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 30, 30, generator=torch.Generator().manual_seed(2))


def write_images(folder: Path, n: int = 4) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def test_dual_encoder_families_are_registered():
    assert DUAL == ["clip"] and FAMILIES["clip"].inputs == "image-text" and "image-text" in HEADS


@pytest.mark.parametrize("eos_token_id", [98, 2], ids=["first-eos", "argmax"])
def test_embeddings_and_logits_match_transformers(tmp_path, kernels, eos_token_id):
    ref = clip_folder(tmp_path, eos_token_id)
    model = load_model(tmp_path, kernels=kernels)
    assert isinstance(model, DualEncoder)
    ids, mask = texts_batch()
    x = pixels()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=x)
        text, image = model.encode_text(ids, mask), model.encode_image(x)
        text_out = ref.text_model(input_ids=ids, attention_mask=mask)
        got_text = model.text(ids, mask).last_hidden_state
    assert expected.logits_per_image.abs().max() > 0.1
    # transformers' text_embeds/image_embeds are normalized; get_*_features are not
    assert (ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output - text).abs().max() <= TOL
    assert (ref.get_image_features(pixel_values=x).pooler_output - image).abs().max() <= TOL
    assert (similarity(image, text, model.logit_scale) - expected.logits_per_image).abs().max() <= TOL
    real = mask.bool()  # padded positions: whatever each library makes of a row that sees nothing new
    assert (text_out.last_hidden_state[real] - got_text[real]).abs().max() <= TOL


def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path):
    ref = clip_folder(tmp_path / "hf")
    save_model(load_model(tmp_path / "hf"), tmp_path / "graft")
    again = transformers.CLIPModel.from_pretrained(tmp_path / "graft").eval()
    ids, mask = texts_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
        got = again(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
    assert (expected - got).abs().max() <= TOL
    assert again.config.text_config.eos_token_id == 98 and again.config.projection_dim == 16


def test_contrastive_loss_matches_transformers(tmp_path, kernels):
    ref = clip_folder(tmp_path)
    model = load_model(tmp_path, task="image-text", kernels=kernels)
    assert isinstance(model, TaskModel) and model.task == "image-text"
    ids, mask = texts_batch()
    x = pixels(3)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=x, return_loss=True)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=x, labels=torch.arange(3))
    assert abs(expected.loss.item() - got.loss.item()) <= TOL
    # the temperature learns: its gradient reaches logit_scale through the head's output
    model.train()
    model(input_ids=ids, attention_mask=mask, pixel_values=x, labels=torch.arange(3)).loss.backward()
    assert model.body.logit_scale.grad is not None and model.body.logit_scale.grad.abs() > 0


def test_zero_shot_logits_equal_transformers(tmp_path):
    ref = clip_folder(tmp_path)
    model, processor = load_model(tmp_path), load_processor(tmp_path)
    files = write_images(tmp_path / "images", 3)
    labels = ["car", "cat", "shoe"]
    tok = processor.tokenizer
    pixel_values = processor.images([str(f) for f in files])
    # one template: exactly CLIPModel's logits_per_image for the prompts
    logits = zero_shot_images(model, processor, [str(f) for f in files], labels, ["a photo of a {}."])
    enc = tok.encode([f"a photo of a {label}." for label in labels])
    with torch.no_grad():
        expected = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixel_values)
    assert (logits - expected.logits_per_image).abs().max() <= TOL
    # several templates: the normalized mean of the normalized prompt embeddings (prompt ensembling)
    templates = ["a photo of a {}.", "a drawing of the {}", "{}"]
    logits = zero_shot_images(model, processor, [str(f) for f in files], labels, templates)
    with torch.no_grad():
        vectors = []
        for label in labels:
            enc = tok.encode([t.replace("{}", label) for t in templates])
            e = ref.get_text_features(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask
            ).pooler_output
            vectors.append(
                torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=-1)
            )
        image = torch.nn.functional.normalize(
            ref.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1
        )
        expected = ref.logit_scale.exp() * image @ torch.stack(vectors).T
    assert (logits - expected).abs().max() <= TOL


@pytest.mark.parametrize(
    ("labels", "templates", "message"),
    [
        ([], ["{}"], "zero-shot: no labels given"),
        (["cat", " "], ["{}"], "zero-shot: label 2 is empty"),
        (["cat", "cat"], ["{}"], "zero-shot: label 'cat' is given twice"),
        (["cat"], ["a photo"], "zero-shot: template 'a photo' must hold the label's place once as {}"),
        (["cat"], ["{} or {}"], "zero-shot: template '{} or {}' must hold"),
    ],
)
def test_bad_labels_and_templates_are_one_line_errors(labels, templates, message):
    with pytest.raises(GraftError, match="^" + message.replace("{", r"\{").replace("}", r"\}")):
        label_embeddings(lambda texts: torch.zeros(len(texts), 4), labels, templates)


def test_bad_tower_config_names_the_tower_key(tmp_path):
    clip_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraftError, match=r"config\.json: vision_config\.hidden_size 32 is not divisible by"):
        load_model(tmp_path)


def test_image_text_head_on_a_text_model_is_one_line_error(tmp_path):
    hf_model("bert").save_pretrained(tmp_path)
    with pytest.raises(GraftError, match="^image-text: a bert model has no text and image towers"):
        load_model(tmp_path, task="image-text")


# ------------------------------------------------------------------------------------------- CLI


def test_info_shows_both_towers(tmp_path, cli):
    ref = clip_folder(tmp_path)
    facts = json.loads(cli("info", tmp_path, "--json").ok().stdout)
    assert facts["parameters"] == ref.num_parameters()
    assert (facts["text_layers"], facts["vision_layers"], facts["projection_dim"]) == (2, 2, 16)


def test_embed_images_and_texts(tmp_path, cli):
    clip_folder(tmp_path / "clip")
    files = write_images(tmp_path / "images", 3)
    model, processor = load_model(tmp_path / "clip"), load_processor(tmp_path / "clip")
    result = cli("embed", tmp_path / "clip", "--image", tmp_path / "images").ok()
    got = np.array([json.loads(line) for line in result.stdout.splitlines()])
    expected = encode_images(model, processor.images, [str(f) for f in files], normalize=False)
    assert got.shape == (3, 16) and np.abs(got - expected.numpy()).max() <= TOL
    result = cli("embed", tmp_path / "clip", "--text", "a red car", "--text", "a cat", "--normalize").ok()
    got = np.array([json.loads(line) for line in result.stdout.splitlines()])
    assert np.abs(got - encode_texts(model, processor.tokenizer, ["a red car", "a cat"]).numpy()).max() <= TOL


def test_search_returns_the_planted_image(tmp_path, cli):
    clip_folder(tmp_path / "clip")
    write_images(tmp_path / "images", 4)
    (tmp_path / "texts.txt").write_text("a red car\na cat\na blue shoe\n")
    cli(
        "index",
        tmp_path / "clip",
        tmp_path / "images",
        "--texts",
        tmp_path / "texts.txt",
        "--out",
        tmp_path / "index",
    ).ok()
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert len(meta["images"]) == 4 and meta["texts"] == ["a red car", "a cat", "a blue shoe"]
    # plant: image 2's vector becomes the query's own embedding, so it must rank first with cosine 1
    model, processor = load_model(tmp_path / "clip"), load_processor(tmp_path / "clip")
    images = np.load(tmp_path / "index" / "images.npy")
    images[2] = encode_texts(model, processor.tokenizer, ["a green bag"])[0].numpy()
    np.save(tmp_path / "index" / "images.npy", images)
    lines = (
        cli("search", tmp_path / "index", "--text", "a green bag", "--top-k", "2").ok().stdout.splitlines()
    )
    first = json.loads(lines[0])
    assert len(lines) == 2 and first["path"] == meta["images"][2] and abs(first["score"] - 1) <= TOL
    # an image ranks the texts: the order of the cosines the library computes
    query = write_images(tmp_path / "query", 1)[0]
    lines = cli("search", tmp_path / "index", "--image", query, "--top-k", "3").ok().stdout.splitlines()
    scores = (
        encode_texts(model, processor.tokenizer, meta["texts"])
        @ encode_images(model, processor.images, [str(query)])[0]
    )
    expected = [meta["texts"][i] for i in scores.argsort(descending=True).tolist()]
    assert [json.loads(line)["text"] for line in lines] == expected


def test_zeroshot_prints_predictions(tmp_path, cli):
    clip_folder(tmp_path / "clip")
    files = write_images(tmp_path / "images", 2)
    args = (
        "zeroshot",
        tmp_path / "clip",
        "--labels",
        "car, cat,shoe",
        "--templates",
        "a photo of a {}.",
        "--templates",
        "{}",
    )
    rows = [json.loads(line) for line in cli(*args, *files).ok().stdout.splitlines()]
    logits = zero_shot_images(
        load_model(tmp_path / "clip"), load_processor(tmp_path / "clip"), [str(f) for f in files],
        ["car", "cat", "shoe"], ["a photo of a {}.", "{}"],
    )  # fmt: skip
    probs = logits.softmax(-1)
    assert [r["image"] for r in rows] == [str(f) for f in files]
    for row, p in zip(rows, probs, strict=True):
        assert list(row["scores"]) == ["car", "cat", "shoe"]
        assert row["label"] == ["car", "cat", "shoe"][int(p.argmax())]
        assert abs(row["score"] - float(p.max())) <= TOL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--labels", ""), "zero-shot: no labels given (--labels a,b,c)"),
        (("--labels", "a,,b"), "zero-shot: label 2 is empty (--labels a,b,c)"),
        (
            ("--labels", "a,b", "--templates", "a photo"),
            "zero-shot: template 'a photo' must hold the label's place",
        ),
    ],
)
def test_zeroshot_errors_are_one_line(tmp_path, cli, args, message):
    clip_folder(tmp_path / "clip")
    files = write_images(tmp_path / "images", 1)
    assert cli("zeroshot", tmp_path / "clip", *args, *files).error_line().startswith("error: " + message)


def test_cli_refuses_a_model_without_towers(tmp_path, cli):
    hf_model("vit").save_pretrained(tmp_path / "vit")
    files = write_images(tmp_path / "images", 1)
    line = cli("zeroshot", tmp_path / "vit", "--labels", "a,b", *files).error_line()
    assert (
        line
        == f"error: zeroshot: {tmp_path / 'vit'} is a vit model, which has no text and image towers (use a CLIP model)"
    )
    assert (
        "search: give either --text"
        in cli("search", tmp_path, "--text", "a", "--image", files[0]).error_line()
    )
    assert cli("search", tmp_path, "--text", "a").error_line() == (
        f"error: {tmp_path}: not an index (index.json not found; graft index writes one)"
    )


# ------------------------------------------------------------------------------------- training


def caption_data(tmp_path: Path, n: int = 12) -> Path:
    """A CSV of (image_path, text) rows, captions repeating as template-written ones do."""
    files = write_images(tmp_path / "images", n)
    captions = ["a red car", "a cat", "a blue shoe", "a green bag"]
    rows = ["image_path,text"] + [f"{f},{captions[i % 4]}" for i, f in enumerate(files)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.csv"


@pytest.mark.parametrize("strategy", ["freeze:tower=text", "lora:pattern=vision\\..*\\.(q|v)"])
def test_train_clip_on_captions_keeps_the_frozen_tower(tmp_path, cli, strategy):
    clip_folder(tmp_path / "clip")
    data = caption_data(tmp_path)
    name, _, option = strategy.partition(":")
    key, _, value = option.partition("=")
    recipe = Path(__file__).parents[1] / "recipes" / "classification.yaml"
    cli(
        "train", recipe, f"model.path={tmp_path / 'clip'}", "task.name=image-text", f"data.train={data}",
        "data.val_fraction=0.25", "data.test_fraction=0", "train.epochs=1", "train.batch_size=4",
        "optim.lr=1e-2", f"train.output={tmp_path / 'run'}", "train.plots=false", "eval.metric=loss",
        f"strategy.name={name}", f"strategy.options.{key}={value}", "-q",
    ).ok()  # fmt: skip
    before, after = load_model(tmp_path / "clip"), load_model(tmp_path / "run" / "model")
    assert isinstance(after, TaskModel) and after.task == "image-text"
    old, new = before.state_dict(), after.body.state_dict()
    # the text tower never moves (frozen, or no LoRA target there); the image tower learned
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("text."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("vision.layers."))
    again = transformers.CLIPModel.from_pretrained(tmp_path / "run" / "model").eval()
    ids, mask = texts_batch()
    with torch.no_grad():
        expected = again(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
        got = similarity(
            after.body.encode_image(pixels()), after.body.encode_text(ids, mask), after.body.logit_scale
        )
    assert (expected - got).abs().max() <= TOL


def test_strategies_that_do_not_apply_to_two_towers_are_one_line_errors(tmp_path):
    from graft.strategies import STRATEGIES, apply_strategy

    clip_folder(tmp_path)
    applies = {name for name, s in STRATEGIES.items() if s.towers}
    assert applies == {"full", "freeze", "bitfit", "lora"}
    for name in sorted(set(STRATEGIES) - applies):
        with pytest.raises(GraftError, match=f"^strategy '{name}' does not apply to a clip model"):
            apply_strategy(load_model(tmp_path, task="image-text"), name)
    with pytest.raises(
        GraftError, match="^strategy 'freeze': option 'tower' names .*: tower=text or tower=vision"
    ):
        apply_strategy(load_model(tmp_path, task="image-text"), "freeze:tower=audio")


def test_a_sentence_encoder_as_text_tower_pools_by_mean_and_is_not_saved_as_clip(tmp_path, minilm):
    """LiT-style (bench/lit.py): all-MiniLM-L6-v2 as the text tower, read as sentence-transformers reads it."""
    from graft.nn import DualEncoderConfig, TransformerConfig
    from graft.tasks.embedding import embed
    from graft.tokenizer import Tokenizer

    text = load_model(minilm, task="base", kernels=False)
    vision = TransformerConfig(
        family="vit", vocab_size=0, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37,
        max_positions=17, inputs="patches", image_size=28, patch_size=7, num_channels=1, prenorm=True,
    )  # fmt: skip
    cfg = DualEncoderConfig(
        family="clip", text=text.config, vision=vision, projection_dim=16, text_pooling="mean"
    )
    body = DualEncoder(cfg).eval()
    body.text = text
    tokenizer = Tokenizer.from_folder(minilm)
    texts = ["a photo of a sneaker.", "this is a bag, seen from above on a plain background."]
    enc = tokenizer.encode(texts)
    with torch.no_grad():
        got = body.pool_text(enc.input_ids, enc.attention_mask)
    assert (got - embed(text, tokenizer, texts)).abs().max() <= TOL
    with pytest.raises(
        GraftError, match="^CLIP's layout holds CLIP's towers only, not bert \\(pooled by mean\\) and vit"
    ):
        save_model(body, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(GraftError, match="^config: text_pooling='cls' is not one of eos, mean"):
        DualEncoderConfig(
            family="clip", text=text.config, vision=vision, projection_dim=16, text_pooling="cls"
        )


def mixed_clip(tmp_path: Path, vision: str) -> DualEncoder:
    """A tiny LiT-style CLIP: BERT as the text tower (mean-pooled), and a ViT or CLIP image tower."""
    from graft.nn import DualEncoderConfig

    hf_model("bert").save_pretrained(tmp_path / "bert")
    text = load_model(tmp_path / "bert", task="base")
    if vision == "clip":
        clip_folder(tmp_path / "clip")
        image = load_model(tmp_path / "clip", task="base").vision
    else:
        hf_model("vit").save_pretrained(tmp_path / "vit")
        image = load_model(tmp_path / "vit", task="base")
    cfg = DualEncoderConfig(
        family="clip", text=text.config, vision=image.config, projection_dim=16, text_pooling="mean"
    )
    body = DualEncoder(cfg)
    body.text, body.vision = text, image  # the pretrained towers, in place of random ones
    return body


@pytest.mark.parametrize("vision", ["vit", "clip"])
def test_lora_on_a_clip_with_a_sentence_encoder_text_tower_wraps_both_towers(tmp_path, vision):
    from graft.strategies import apply_strategy
    from graft.strategies.lora import lora_modules
    from graft.tasks.image_text import ImageTextHead

    body = mixed_clip(tmp_path, vision)
    model = apply_strategy(TaskModel(body, ImageTextHead(body)), "lora:targets=q+v")
    wrapped = set(lora_modules(model))
    assert wrapped == {f"{t}.layers.{i}.attn.{m}" for t in ("text", "vision") for i in range(2) for m in "qv"}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"body.{w}.lora_{ab}.weight" for w in wrapped for ab in "AB"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # lora_B starts at zero, so lora_A moves from the second step
        logits = similarity(body.encode_image(pixels()), body.encode_text(ids), body.logit_scale)  # (2, 2)
        torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trained  # every adapter weight, in both towers, and nothing else
    # an HF name selects by the tower's own family: BERT's and ViT's 'query', CLIP's 'q_proj'
    hf_names = {"query": {"text", "vision"} if vision == "vit" else {"text"}, "q_proj": {"vision"}}
    for targets, towers in hf_names.items():
        if vision == "vit" and targets == "q_proj":
            with pytest.raises(GraftError, match="^strategy 'lora': no Linear layer matches targets"):
                apply_strategy(mixed_clip(tmp_path, vision), f"lora:targets={targets}")
            continue
        model = apply_strategy(mixed_clip(tmp_path, vision), f"lora:targets={targets}")
        assert set(lora_modules(model)) == {f"{t}.layers.{i}.attn.q" for t in towers for i in range(2)}


def test_commands_for_one_stack_refuse_clip_in_one_line(tmp_path, cli):
    clip_folder(tmp_path / "hf")
    save_model(
        load_model(tmp_path / "hf", task="image-text"), tmp_path / "clip", load_processor(tmp_path / "hf")
    )
    data = caption_data(tmp_path, 4)
    for args, start in (
        (("prune", tmp_path / "clip", tmp_path / "out", "--data", data, "--ffn", "0.3"), "prune: a clip model has two stacks (a text and an image tower)"),
        (("heads", tmp_path / "clip", "--data", data, "--out", tmp_path / "h"), "head importance: a clip model has two stacks (a text and an image tower)"),
        (("explain", tmp_path / "clip", "--text", "a cat"), "explain: the image-text task is not supported"),
    ):  # fmt: skip
        assert cli(*args).error_line().startswith("error: " + start), args
