"""graft tokenizer train / extend: new vocabularies, and domain words that leave the old ones alone."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_pretrain import LINES, tiny_folder

from graft.loading import load_model
from graft.tokenizer import Tokenizer

CORPUS = LINES * 3 + ["Two households, both alike in dignity, in fair Verona, where we lay our scene"]


@pytest.mark.parametrize(("kind", "size"), [("wordpiece", 120), ("bpe", 300), ("unigram", 120)])
def test_trained_tokenizer_round_trips_and_transformers_reads_it(kind, size, cli, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / kind
    result = json.loads(
        cli("tokenizer", "train", tmp_path / "corpus.txt", "--kind", kind, "--vocab-size", size, "--out", out)
        .ok()
        .stdout
    )
    assert (
        len(
            cli("tokenizer", "train", tmp_path / "corpus.txt", "--out", tmp_path / "again")
            .ok()
            .stdout.splitlines()
        )
        == 1
    )
    assert result["kind"] == kind and 10 < result["vocab_size"] <= size
    ours = Tokenizer.from_folder(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in CORPUS[:4]:
        ids = ours.encode(text, return_tensors=None).input_ids[0]
        assert ids == theirs(text)["input_ids"]
        back = "".join(ours.decode(ids).split())  # wordpiece decodes punctuation as a word of its own
        assert back == "".join(
            (text.lower() if kind != "bpe" else text).split()
        )  # wordpiece/unigram: uncased
    if kind == "wordpiece":
        assert (
            ours.mask_token_id is not None
            and ours.encode("x", return_tensors=None).input_ids[0][0] == ours.cls_token_id
        )


def test_an_empty_corpus_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    assert cli("tokenizer", "train", tmp_path / "empty.txt", "--out", tmp_path / "t").error_line() == (
        f"error: tokenizer: the corpus has no text ({tmp_path / 'empty.txt'})"
    )
    assert cli("tokenizer", "train", tmp_path / "none.txt", "--out", tmp_path / "t").error_line() == (
        f"error: {tmp_path / 'none.txt'}: file not found"
    )
    assert cli(
        "tokenizer", "train", tmp_path / "empty.txt", "--kind", "bpe2", "--out", tmp_path / "t"
    ).error_line() == ("error: tokenizer: --kind bpe2: unknown (known: wordpiece, bpe, unigram)")
    assert cli(
        "tokenizer",
        "train",
        tmp_path / "empty.txt",
        "--kind",
        "bpe",
        "--vocab-size",
        100,
        "--out",
        tmp_path / "t",
    ).error_line() == (
        "error: tokenizer: --vocab-size 100 leaves no merges: a byte-level BPE starts with 257 tokens"
        " (256 bytes and <|endoftext|>)"
    )
    assert not (tmp_path / "t").exists()


def test_extension_keeps_old_ids_and_outputs_and_makes_a_word_one_token(cli, tmp_path, minilm):
    out = tmp_path / "minilm-verona"
    (tmp_path / "words.txt").write_text("Capulet\nMontague\nthe\n")
    result = json.loads(
        cli("tokenizer", "extend", minilm, "Benvolio", tmp_path / "words.txt", "--out", out).ok().stdout
    )
    assert result == {"added": ["Benvolio", "Capulet", "Montague"], "skipped": ["the"], "vocab_size": 30525}
    old_tok, new_tok = Tokenizer.from_folder(minilm), Tokenizer.from_folder(out)
    old, new = load_model(minilm, kernels=False), load_model(out, kernels=False)
    with torch.no_grad():
        for text in LINES:  # old-vocabulary texts: the same ids, the same hidden states
            ids = old_tok.encode(text, return_tensors=None).input_ids[0]
            assert new_tok.encode(text, return_tensors=None).input_ids[0] == ids
            x = torch.tensor([ids])
            assert torch.equal(old(input_ids=x).last_hidden_state, new(input_ids=x).last_hidden_state)
        # a new word is one token, its row the mean of its old pieces' rows
        ids = new_tok.encode("Benvolio, Capulet", return_tensors=None).input_ids[0]
        assert ids[1:4] == [30522, 1010, 30523] and len(ids) == 5  # [CLS] benvolio , capulet [SEP]
        pieces = old_tok.encode("Capulet", add_special_tokens=False, return_tensors=None).input_ids[0]
        table = new.embed.tokens.weight
        assert len(pieces) > 1 and torch.allclose(table[30523], table[pieces].mean(0), atol=1e-6)
    # saved together: transformers reads the same ids and the grown table
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs("Benvolio, Capulet")["input_ids"] == ids
    assert transformers.AutoModel.from_pretrained(out).embeddings.word_embeddings.weight.shape[0] == 30525


def test_extension_grows_a_tied_masked_lm_head(cli, tmp_path, minilm):
    base = tiny_folder(tmp_path, minilm, "bert")
    out = tmp_path / "grown"
    cli("tokenizer", "extend", base, "Capulet", "--out", out).ok()
    old, new = load_model(base, kernels=False), load_model(out, kernels=False)
    assert new.head.decoder.weight is new.body.embed.tokens.weight  # still tied
    x = torch.tensor([Tokenizer.from_folder(base).encode(LINES[0], return_tensors=None).input_ids[0]])
    with torch.no_grad():
        before, after = old(input_ids=x).logits, new(input_ids=x).logits  # (1, T, V), (1, T, V + 1)
    assert after.shape[-1] == before.shape[-1] + 1 and torch.equal(after[..., :-1], before)
    pieces = (
        Tokenizer.from_folder(base)
        .encode("Capulet", add_special_tokens=False, return_tensors=None)
        .input_ids[0]
    )
    assert torch.allclose(new.head.decoder.bias[-1], new.head.decoder.bias[pieces].mean(), atol=1e-7)
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(out)) is transformers.BertForMaskedLM


def test_extension_refusals_are_one_line(cli, tmp_path, minilm):
    assert cli("tokenizer", "extend", minilm, "two words", "--out", tmp_path / "x").error_line() == (
        "error: 'two words': a domain word is one word, without spaces"
    )
    (tmp_path / "blank.txt").write_text("\n")
    assert cli(
        "tokenizer", "extend", minilm, tmp_path / "blank.txt", "--out", tmp_path / "x"
    ).error_line() == (
        "error: tokenizer extend: no words to add (give words, or a .txt file of a word per line)"
    )
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    assert cli("tokenizer", "extend", minilm, "verona", "--out", tmp_path / "x").error_line() == (
        f"error: {tmp_path / 'x'}: folder is not empty (pass --overwrite to replace it)"
    )
