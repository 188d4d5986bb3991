"""Constrained decoding (graft.generation.constrain): whatever a model's scores say, the new text
matches the JSON schema, regular expression or Lark grammar asked for, and among the tokens the
constraint allows greedy decoding takes the likeliest."""

from __future__ import annotations

import json
import re

import pytest
import torch

from graft.errors import GraftError
from graft.generation import GenerationConfig, generate
from graft.generation.constrain import WHITESPACE, Constraint, Vocabulary
from graft.loading import load_model

llg = pytest.importorskip("llguidance")  # part of the test extra: its absence is the import's error

EOS = 256  # the byte-level vocabulary's 256 bytes, then end-of-text

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}


def byte_gpt2(folder, vocab_size: int = EOS + 1, n_positions: int = 512):
    """A tiny random GPT-2 saved in ``folder`` over a byte-level vocabulary (token i is byte i, no
    merges, end-of-text at 256, ids past it left for the caller's tokens), and that vocabulary's
    tokenizers.Tokenizer, not saved yet."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": EOS}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return backend


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random GPT-2 over a byte-level vocabulary (one token per byte, no merges) and its tokenizer."""
    from graft.tokenizer import Tokenizer as GraftTokenizer

    folder = tmp_path_factory.mktemp("byte-gpt2")
    byte_gpt2(folder).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return load_model(folder, task="causal-lm"), GraftTokenizer.from_folder(folder)


def decode_new(byte_model, prompt: str, **options) -> list[list[int]]:
    """Each row's new tokens for four copies of ``prompt`` (sampled rows differ)."""
    model, tokenizer = byte_model
    ids = torch.tensor([tokenizer.encode(prompt, return_tensors=None).input_ids[0]] * 4)
    options = {"max_new_tokens": 300} | options  # JSON's whitespace: at most 25 characters between tokens
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=EOS, **options)
    out = generate(model, ids, None, config, tokenizer=tokenizer)[:, ids.shape[1] :]
    return [row.tolist() for row in out]


def text_of(tokenizer, row: list[int]) -> str:
    """The row's text up to its end-of-text token, which must be there: the constraint finished it."""
    assert EOS in row, "the row ran to max_new_tokens without completing its text"
    return tokenizer.decode(row[: row.index(EOS)])


SAMPLING = [
    {},
    {"do_sample": True, "seed": 3},
    {"do_sample": True, "seed": 4, "top_k": 5, "temperature": 2.0},
]


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "sampled", "top-k"])
def test_a_json_schema_gives_json_that_matches_it(byte_model, sampling):
    for row in decode_new(byte_model, "Is it? ", json_schema=SCHEMA, **sampling):
        reply = json.loads(text_of(byte_model[1], row))
        assert set(reply) == {"answer", "n"} and reply["answer"] in ("yes", "no") and 0 <= reply["n"] <= 9


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "sampled", "top-k"])
def test_a_regex_and_a_lark_grammar_give_text_they_match(byte_model, sampling):
    for row in decode_new(byte_model, "Code: ", regex=r"[0-9]{3}-(yes|no)", **sampling):
        assert re.fullmatch(r"[0-9]{3}-(yes|no)", text_of(byte_model[1], row))
    lark = 'start: "cat" | "dog" | "bird " NUMBER\nNUMBER: /[1-9][0-9]?/'
    for row in decode_new(byte_model, "Pet: ", grammar=lark, **sampling):
        assert re.fullmatch(r"cat|dog|bird [1-9][0-9]?", text_of(byte_model[1], row))


def test_a_schema_may_ask_for_compact_json(byte_model):
    compact = SCHEMA | {"x-guidance": {"whitespace_flexible": False}}  # llguidance's own options
    for row in decode_new(byte_model, "Is it? ", json_schema=compact, do_sample=True, seed=0):
        assert re.fullmatch(r'\{"answer":"(yes|no)","n":[0-9]\}', text_of(byte_model[1], row))


def test_any_json_object(byte_model):
    for row in decode_new(byte_model, "{", json_schema={"type": "object"}):
        if EOS in row:  # a random model may keep an open object going to the end
            assert isinstance(json.loads(text_of(byte_model[1], row)), dict)
        else:
            assert byte_model[1].decode(row).lstrip().startswith("{")


def test_greedy_takes_the_likeliest_token_the_constraint_allows(byte_model):
    """Replayed step by step against the model's own scores and a fresh llguidance parser."""
    model, tokenizer = byte_model
    prompt = tokenizer.encode("Is it? ", return_tensors=None).input_ids[0]
    row = decode_new(byte_model, "Is it? ", json_schema=SCHEMA)[0]
    vocabulary = Vocabulary(tokenizer, EOS + 1, [EOS])
    matcher = llg.LLMatcher(vocabulary.tokenizer, llg.LLMatcher.grammar_from_json_schema(SCHEMA, WHITESPACE))
    for step, token in enumerate(row[: row.index(EOS) + 1]):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + row[:step]])).logits[0, -1]  # (V,)
        allowed = torch.tensor(
            [
                i
                for i in range(EOS + 1)
                if matcher.validate_tokens([i]) == 1 or (i == EOS and matcher.is_accepting())
            ]
        )
        assert token == int(allowed[logits[allowed].argmax()]), f"step {step}"
        if token != EOS:
            assert matcher.consume_token(token)
    assert matcher.is_accepting()


def test_the_mask_is_applied_before_the_samplers_filters(byte_model):
    """top_k 1 keeps the best allowed token (after the mask): the same text as greedy, never -inf everywhere."""
    greedy = decode_new(byte_model, "Code: ", regex=r"[a-c]{4}")
    top1 = decode_new(byte_model, "Code: ", regex=r"[a-c]{4}", do_sample=True, top_k=1, seed=0)
    assert greedy == top1


def test_bad_constraints_are_refused_naming_the_option(byte_model):
    model, tokenizer = byte_model
    with pytest.raises(GraftError, match=r"json_schema and regex: give at most one"):
        GenerationConfig(json_schema=SCHEMA, regex="a")
    with pytest.raises(GraftError, match=r"regex constrains greedy decoding or sampling, not beam search"):
        GenerationConfig(regex="a", num_beams=2)
    vocabulary = Vocabulary(tokenizer, EOS + 1, [EOS])
    with pytest.raises(GraftError, match=r"^generation: json_schema: .*frob"):
        Constraint(vocabulary, GenerationConfig(json_schema={"type": "frob"}), 1)
    with pytest.raises(GraftError, match=r"^generation: regex: "):
        Constraint(vocabulary, GenerationConfig(regex="("), 1)
    with pytest.raises(GraftError, match=r"^generation: grammar: "):
        Constraint(vocabulary, GenerationConfig(grammar="start: undefined_rule"), 1)
    with pytest.raises(GraftError, match="end-of-text"):
        Vocabulary(tokenizer, EOS + 1, [])
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(GraftError, match="need the tokenizer"):
        generate(model, ids, None, GenerationConfig(eos_token_id=EOS, regex="a"))


def test_a_row_whose_parser_failed_may_only_end(byte_model):
    """A token the constraint did not allow (a caller's own choice) leaves its row with end-of-text
    only, never a row of -inf scores that greedy or sampling would turn into garbage or NaN."""
    tokenizer = byte_model[1]
    constraint = Constraint(Vocabulary(tokenizer, EOS + 1, [EOS]), GenerationConfig(regex="[0-9]+"), 2)
    letter = tokenizer.encode("a", return_tensors=None).input_ids[0][0]
    constraint.advance([letter, letter], [0])  # row 0 takes a letter the regex does not allow
    allowed = constraint.allowed()
    assert allowed[0].nonzero()[:, 0].tolist() == [EOS]
    digits = {tokenizer.encode(str(d), return_tensors=None).input_ids[0][0] for d in range(10)}
    assert set(allowed[1].nonzero()[:, 0].tolist()) == digits  # row 1 untouched: a digit first


def test_a_tokenizer_keeps_its_vocabulary_for_every_later_generate_call(byte_model, monkeypatch):
    """llguidance's reading of the vocabulary (0.3-0.6 s for a real one) is built by the first
    constrained call and kept by the tokenizer; another size or end-of-text builds another."""
    model, tokenizer = byte_model
    built = []
    init = Vocabulary.__init__
    monkeypatch.setattr(Vocabulary, "__init__", lambda self, *a: built.append(a) or init(self, *a))
    tokenizer._derived.clear()  # (other tests here have used it)
    decode_new(byte_model, "Is it? ", regex="[0-9]+")
    decode_new(byte_model, "Is it? ", json_schema=SCHEMA)
    assert len(built) == 1
    assert Vocabulary.of(tokenizer, EOS + 1, [EOS]) is Vocabulary.of(tokenizer, EOS + 1, [EOS])
    assert len(built) == 1
    assert Vocabulary.of(tokenizer, EOS + 1, [EOS, 10]) is not Vocabulary.of(tokenizer, EOS + 1, [EOS])
    assert len(built) == 2
