"""Pretraining's data: packed rows give every document exactly what it gets alone."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from conftest import hf_model, tiny_hf_config

from graft.data.masking import words_from_pieces
from graft.data.packing import IGNORE, pack_rows, packable, packed_batch
from graft.errors import GraftError
from graft.loading import load_model
from graft.models import FAMILIES
from graft.pretrain import documents as read_documents
from graft.pretrain.objectives import check_packable
from graft.pretrain.stream import clm_batches, mlm_batches, mlm_windows
from graft.tasks.base import body_inputs
from graft.tokenizer import Tokenizer

TOL = 1e-5
DECODERS = sorted(name for name, f in FAMILIES.items() if f.decoder)
# encoder-only families (encoder-decoders pack their encoder's input only once span corruption lands)
ENCODERS = sorted(
    name for name, f in FAMILIES.items() if not f.decoder and f.inputs == "tokens" and not f.encoder_decoder
)


def documents(lengths=(7, 3, 12, 1, 5, 9, 4), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]


def first_position(model) -> int:
    cfg = model.config
    return cfg.pad_token_id + 1 if cfg.positions_from_padding else 0


def test_rows_hold_whole_documents_in_order_and_cut_long_ones():
    rows = pack_rows(documents(), 12)
    assert [[len(d) for d in row] for row in rows] == [[7, 3], [12], [1, 5], [9], [4]]
    assert [t for row in rows for d in row for t in d] == [t for d in documents() for t in d]
    assert [[len(d) for d in row] for row in pack_rows([list(range(25))], 10)] == [[10], [10], [5]]
    with pytest.raises(GraftError, match="^packing: the row width must be at least 1, found 0$"):
        pack_rows(documents(), 0)


def test_positions_restart_and_no_token_sees_another_document():
    batch = packed_batch(pack_rows(documents(), 12), pad_id=1, causal=True, first_position=2)
    assert batch["position_ids"][0].tolist() == [2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 2, 2]  # RoBERTa-style offset
    assert batch["labels"][0, 7].item() == IGNORE  # the 2nd document's first token: nothing predicts it
    docs, mask = batch["documents"], batch["attention_mask"][:, 0]  # (B, T), (B, T, T)
    cross = (docs[:, :, None] != docs[:, None, :]) & mask
    assert not cross[docs >= 0].any()  # a real query never attends another document (or padding)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_packed_causal_lm_losses_equal_each_document_alone(family, kernels, tmp_path):
    hf_model(family, "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    docs = documents()
    cfg = model.config
    batch = packed_batch(pack_rows(docs, 16), 0, True, first_position(model), cfg.sliding_window)
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none"
        )  # (B, T - 1)
        packed = []
        for b in range(nll.shape[0]):
            for d in range(int(batch["documents"][b].max()) + 1):
                packed.append(nll[b][batch["documents"][b, 1:] == d].sum())
        alone = []
        for doc in docs:
            ids = torch.tensor([doc])
            out = model(input_ids=ids, labels=ids)
            alone.append(out.loss * (len(doc) - 1) if len(doc) > 1 else torch.tensor(0.0))
    assert len(packed) == len(alone)
    for doc, p, a in zip(docs, packed, alone, strict=True):
        assert abs(p - a) / max(len(doc) - 1, 1) <= TOL  # per-document mean loss


@pytest.mark.parametrize("family", ENCODERS)
def test_packed_encoder_outputs_equal_each_document_alone(family, tmp_path):
    """Bidirectional within a document only, positions from each document's start (RoBERTa: pad + 1)."""
    hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=False)
    docs = documents()
    batch = packed_batch(pack_rows(docs, 16), model.config.pad_token_id, False, first_position(model))
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state  # (B, T, H)
        i = 0
        for b in range(packed.shape[0]):
            for d in range(int(batch["documents"][b].max()) + 1):
                alone = model(input_ids=torch.tensor([docs[i]])).last_hidden_state[0]  # (n, H)
                assert (packed[b][batch["documents"][b] == d] - alone).abs().max() <= TOL
                i += 1
    assert i == len(docs)


# ---- graft pretrain RECIPE: streamed text in, a HF folder transformers loads out ----
LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
]


def tiny_folder(tmp_path, minilm, family: str):
    """A random tiny transformers model of ``family`` (MLM for encoders, LM for decoders) with MiniLM's tokenizer."""
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.vocab_size = 30522
    cls = transformers.AutoModelForCausalLM if FAMILIES[family].decoder else transformers.AutoModelForMaskedLM
    folder = tmp_path / f"{family}-base"
    cls.from_config(cfg).save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    return folder


def write_recipe(tmp_path, model, objective: str, **train) -> Path:
    (tmp_path / "plays.txt").write_text("\n".join(LINES[:2]) + "\n\n")
    (tmp_path / "plays.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES[2:]))
    recipe = {
        "model": {"path": str(model)},  # graft's kernels on, as users run it
        "data": {"max_length": 16},
        "optim": {"lr": 1e-3},
        "pretrain": {
            "objective": objective,
            "files": [str(tmp_path / "plays.txt"), str(tmp_path / "plays.jsonl")],
        },
        "train": {"output": str(tmp_path / "out"), "max_steps": 3, "batch_size": 2, **train},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("family", "objective", "cls"),
    [
        ("bert", "mlm", transformers.BertForMaskedLM),
        ("gpt2", "clm", transformers.GPT2LMHeadModel),
    ],
)
def test_pretrain_saves_a_folder_transformers_loads(family, objective, cls, cli, tmp_path, minilm):
    base = tiny_folder(tmp_path, minilm, family)
    recipe = write_recipe(tmp_path, base, objective)
    summary = json.loads(cli("pretrain", recipe).ok().stdout)
    assert summary["objective"] == objective and summary["steps"] == 3 and summary["tokens"] > 0
    assert math.isfinite(summary["loss"])
    before = cls.from_pretrained(base).eval()
    after = cls.from_pretrained(tmp_path / "out").eval()  # the exact class, every tensor present
    assert type(after) is cls
    ids = torch.tensor([Tokenizer.from_folder(tmp_path / "out").encode(LINES[0]).input_ids[0].tolist()])
    with torch.no_grad():
        changed = (after(input_ids=ids).logits - before(input_ids=ids).logits).abs().max()
        graft_logits = load_model(tmp_path / "out", kernels=False)(input_ids=ids).logits
    assert changed > 1e-3  # it trained
    assert (after(input_ids=ids).logits - graft_logits).abs().max() <= TOL
    saved = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert saved["steps"] == 3 and saved["recipe"]["pretrain"]["objective"] == objective
    # a second run into the same folder needs --overwrite
    assert (
        cli("pretrain", recipe).error_line()
        == f"error: {tmp_path / 'out'}: folder is not empty (pass --overwrite to replace it)"
    )


def test_pretrain_refusals_are_one_line(cli, tmp_path, minilm):
    bert = tiny_folder(tmp_path, minilm, "bert")
    recipe = write_recipe(tmp_path, bert, "clm")
    assert cli("pretrain", recipe).error_line() == (
        f"error: {recipe}: pretrain.objective: clm needs a decoder; a bert model trains with mlm"
    )
    gpt2 = tiny_folder(tmp_path, minilm, "gpt2")
    recipe = write_recipe(tmp_path, gpt2, "mlm")
    assert cli("pretrain", recipe).error_line() == (
        f"error: {recipe}: pretrain.objective: mlm needs a masked-LM family (albert, bert, distilbert, roberta);"
        " a gpt2 model trains with clm"
    )
    assert cli("pretrain", recipe, "train.max_steps=0").error_line() == (
        f"error: {recipe}: train.max_steps: must be > 0 for pretraining (a stream has no length),"
        " e.g. train.max_steps=1000"
    )
    assert (
        cli("pretrain", recipe, "eval.every=5")
        .error_line()
        .startswith(
            f"error: {recipe}: eval.every: not used by graft pretrain (it reads model, optim, schedule, pretrain and"
        )
    )
    assert cli("pretrain", recipe, "pretrain.mask_probability=1").error_line() == (
        "error: override pretrain.mask_probability=1: pretrain.mask_probability: must be in (0, 1), got 1.0"
    )
    # span corruption joins documents end to end: its explicit pack false is refused, not ignored
    spans = cli("pretrain", recipe, "pretrain.objective=span-corruption", "pretrain.pack=false")
    assert spans.error_line() == (
        "error: override pretrain.pack=false: pretrain.pack: span-corruption joins documents end to end"
        " and does not read it (remove it)"
    )
    unpacked = tmp_path / "unpacked.yaml"
    unpacked.write_text(
        recipe.read_text().replace("objective: mlm", "objective: span-corruption\n  pack: false")
    )
    assert cli("pretrain", unpacked).error_line() == (
        f"error: {unpacked}: pretrain.pack: span-corruption joins documents end to end and does not read"
        " it (remove it)"
    )
    (tmp_path / "empty.txt").write_text("\n  \n")
    empty = f"pretrain.files=[{tmp_path / 'empty.txt'}]"
    assert cli("pretrain", recipe, empty, "pretrain.objective=clm").error_line() == (
        f"error: pretrain: the corpus has no text ({tmp_path / 'empty.txt'})"
    )
    assert cli("pretrain", recipe, f"pretrain.files=[{tmp_path / 'none.txt'}]").error_line() == (
        f"error: {tmp_path / 'none.txt'}: file not found"
    )


def test_documents_are_read_lazily_and_bad_lines_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{oops\n')
    stream = read_documents([path])
    assert [next(stream), next(stream)] == ["one", "two"]  # read before the bad line is reached
    with pytest.raises(GraftError, match=rf"^{re.escape(str(path))}:4: not valid JSON \("):
        next(stream)


@pytest.mark.parametrize("pack", [True, False])
def test_causal_batches_hold_every_document_in_order(pack, minilm):
    tokenizer = Tokenizer.from_folder(minilm)
    cfg = load_model(minilm, task="base", kernels=False).config
    batches = list(clm_batches(iter(LINES), cfg, tokenizer, batch_size=2, max_length=32, pack=pack))
    # no eos to append: MiniLM's tokenizer has none
    docs = [tokenizer.encode(t, return_tensors=None).input_ids[0] for t in LINES]
    got, rows = [], 0
    for b in batches:
        for ids, document in zip(b["input_ids"], b["documents"], strict=True):
            rows += 1
            got += [ids[document == d].tolist() for d in range(int(document.max()) + 1)]
    assert got == docs  # every document whole, in order
    assert rows < len(docs) if pack else rows == len(docs)  # packed: several documents share a row


def test_unpacked_causal_rows_cut_a_long_document_into_windows_and_lose_no_token(minilm):
    """pretrain.pack: false: a document of 2.5 rows gives 3 rows (8, 8 and 4 tokens), each its own
    document with positions from 0, whose tokens end to end are the document's; a stream resumed at
    any batch's position gives the rows that followed it."""
    tokenizer = Tokenizer.from_folder(minilm)
    cfg = load_model(minilm, task="base", kernels=False).config
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"  # fmt: skip
    texts = [long, LINES[0]]
    docs = [tokenizer.encode(t, return_tensors=None).input_ids[0] for t in texts]  # [CLS] ... [SEP], no eos
    assert len(docs[0]) == 20 and len(docs[1]) <= 16  # 2.5 rows of 8; the second document: 2 rows
    batches = clm_batches(iter(texts), cfg, tokenizer, batch_size=1, max_length=8, pack=False)
    rows, positions = [], []
    for batch in batches:
        (ids,), (documents,), (where,), (labels,) = (batch[k] for k in ("input_ids", "documents", "position_ids", "labels"))  # fmt: skip
        n = int((documents >= 0).sum())
        assert documents[:n].tolist() == [0] * n  # one document per row
        assert where[:n].tolist() == list(range(n))  # positions from 0 in every window
        assert labels[0] == IGNORE and labels[1:n].tolist() == ids[1:n].tolist()
        rows.append(ids[:n].tolist())
        positions.append(batches.position)
    assert [len(r) for r in rows[:3]] == [8, 8, 4]
    assert [t for r in rows[:3] for t in r] == docs[0] and [t for r in rows[3:] for t in r] == docs[1]
    assert positions[:3] == [(0, 8), (0, 16), (1, 0)]
    for k, (d, token) in enumerate(positions[:-1]):
        resumed = clm_batches(iter(texts[d:]), cfg, tokenizer, batch_size=1, max_length=8, pack=False, start=(d, token))  # fmt: skip
        assert [b["input_ids"][0][b["documents"][0] >= 0].tolist() for b in resumed] == rows[k + 1 :]


LONG = (
    "Supercalifragilisticexpialidocious, said the unstoppable Mary Poppins to the astonished chimney sweeps."
)


def windows_of(batch: dict, pack: bool) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row of a masked-LM batch, its windows' (original ids, labels), each between [CLS] and [SEP]."""
    original = torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])  # (B, T)
    rows = []
    for b in range(original.shape[0]):
        if pack:
            documents = batch["documents"][b]
            spans = [documents == d for d in range(int(documents.max()) + 1)]
        else:
            spans = [torch.arange(original.shape[1]) < int(batch["attention_mask"][b].sum())]
        rows.append([(original[b][at], batch["labels"][b][at]) for at in spans])
    return rows


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("whole_word", [True, False])
def test_masked_lm_rows_cover_every_token_of_long_documents(whole_word, pack, tmp_path, minilm):
    tokenizer = Tokenizer.from_folder(minilm)
    model = load_model(tiny_folder(tmp_path, minilm, "bert"), task="masked-lm", whole_word=whole_word)
    texts = [LONG, *LINES]
    docs = [tokenizer.encode(t, add_special_tokens=False, return_tensors=None).input_ids[0] for t in texts]
    pieces = tokenizer.convert_ids_to_tokens(docs[0])
    assert len(docs[0]) > 3 * 8 and sum(p.startswith("##") for p in pieces[:6]) >= 4  # a word of 5+ pieces
    batches = mlm_batches(iter(texts), model.head, tokenizer, batch_size=3, max_length=6, pack=pack)
    rows, positions = [], []
    for batch in batches:
        positions.append(batches.position)
        for row in windows_of(batch, pack):
            assert sum(len(ids) for ids, _ in row) <= 6
            for ids, labels in row:
                assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
                assert labels[0] == IGNORE and labels[-1] == IGNORE  # special tokens are never masked
                rows.append(ids[1:-1].tolist())
    assert [t for row in rows for t in row] == [t for doc in docs for t in doc]  # every token, once
    # a row starts inside a word only when the word is longer than a row (4 tokens between [CLS] and [SEP])
    # with whole words; without, rows are cut every 4 tokens
    inside = [tokenizer.convert_ids_to_tokens(row)[0].startswith("##") for row in rows]
    if whole_word:
        assert inside[:3] == [False, True, True] and not any(inside[3:])  # 11 pieces: 3 rows
        assert tokenizer.convert_ids_to_tokens(rows[3]) == ["said", "the"]  # "un##sto##ppa##ble" waits
    else:
        assert [len(row) for row in rows[:7]] == [4, 4, 4, 4, 4, 4, 3]
    assert positions[0] == (0, 12)  # 3 rows of the long document: the stream stands inside it
    # resumed at any position, the windows are those the uninterrupted stream cut there
    straight = list(islice(mlm_windows(iter(texts), tokenizer, 4, whole_word), 40))
    for k, (_, (d, token)) in enumerate(straight[:-1]):
        resumed = islice(mlm_windows(iter(texts[d:]), tokenizer, 4, whole_word, (d, token)), 3)
        assert list(resumed) == straight[k + 1 : k + 4]
    with pytest.raises(GraftError, match="^data.max_length: 2 leaves no room for text between the 2 special"):
        mlm_batches(iter(texts), model.head, tokenizer, batch_size=3, max_length=2)


MASKED_LM = sorted(name for name, f in FAMILIES.items() if "masked-lm" in f.architectures)
SHORT = ["Ay.", "No, my lord.", "Farewell."]  # speeches that share a row with others


@pytest.mark.parametrize("family", MASKED_LM)
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_packed_masked_lm_gives_each_document_its_logits_and_loss_alone(family, kernels, tmp_path, minilm):
    """pretrain.pack (the default): every document of a packed row, masked where the batch masked it,
    gets the logits and loss it gets alone (positions from its start, RoBERTa's from pad + 1)."""
    tokenizer = Tokenizer.from_folder(minilm)
    folder = tiny_folder(tmp_path, minilm, family)
    model = load_model(folder, task="masked-lm", kernels=kernels, whole_word=True, mask_probability=0.3)
    assert packable(model.body)  # no masked-LM family's attention mixes the documents of a row
    texts = [LONG, SHORT[0], *LINES, *SHORT[1:]]
    batch = next(mlm_batches(iter(texts), model.head, tokenizer, batch_size=8, max_length=32))
    documents = batch["documents"]  # (B, T)
    assert int(documents.max()) >= 2  # a row holds three documents or more
    nll_packed, nll_alone, masked, i = 0.0, 0.0, 0, 0
    with torch.no_grad():
        out = model(**batch)
        for b in range(documents.shape[0]):
            for d in range(int(documents[b].max()) + 1):
                at = documents[b] == d
                ids, labels = batch["input_ids"][b, at][None], batch["labels"][b, at][None]  # (1, n)
                types = {"token_type_ids": torch.zeros_like(ids)} if "token_type_ids" in batch else {}
                alone = model(input_ids=ids, labels=labels, **types)
                assert (out.logits[b, at] - alone.logits[0]).abs().max() <= TOL
                n = int((labels != IGNORE).sum())
                if n:
                    nll = F.cross_entropy(out.logits[b, at], labels[0], ignore_index=IGNORE, reduction="sum")
                    assert abs(nll / n - alone.loss) <= TOL
                    nll_packed, nll_alone, masked = nll_packed + nll, nll_alone + alone.loss * n, masked + n
                i += 1
    assert i >= len(texts) and masked > 0  # the long speech fills two windows
    assert abs(out.loss - nll_packed / masked) <= TOL and abs(out.loss - nll_alone / masked) <= TOL


@pytest.mark.parametrize("whole_word", [False, True], ids=["tokens", "whole-words"])
def test_masks_on_packed_rows_keep_their_rates_and_spare_special_tokens_and_padding(
    whole_word, tmp_path, minilm
):
    """15% of the tokens (or words: every piece of a chosen word) chosen, 80% of them [MASK], 10%
    random, 10% kept; never a [CLS], [SEP] or pad; drawn afresh for every copy of a document, and
    for each window of a row on its own."""
    tokenizer = Tokenizer.from_folder(minilm)
    model = load_model(tiny_folder(tmp_path, minilm, "bert"), task="masked-lm", whole_word=whole_word, seed=3)
    texts = [LONG, *SHORT, *LINES] * 60
    specials = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
    tokens = chosen = masked = kept = words = chosen_words = shared = differ = 0
    patterns: dict[str, set[tuple[bool, ...]]] = {}
    for batch in mlm_batches(iter(texts), model.head, tokenizer, batch_size=16, max_length=32):
        ids, labels, documents = batch["input_ids"], batch["labels"], batch["documents"]  # (B, T) each
        original = torch.where(labels != IGNORE, labels, ids)
        pick = labels != IGNORE  # (B, T)
        pad = documents < 0
        assert not pick[pad].any() and (ids[pad] == tokenizer.pad_token_id).all()  # pad never masked
        special = torch.isin(original, specials) & ~pad
        assert not pick[special].any() and torch.equal(ids[special], original[special])
        tokens += int((~pad & ~special).sum())
        chosen += int(pick.sum())
        masked += int((ids[pick] == tokenizer.mask_token_id).sum())
        kept += int((ids[pick] == original[pick]).sum())
        for b in range(ids.shape[0]):
            first_words = []  # whether each window's first word was chosen
            for d in range(int(documents[b].max()) + 1):
                at = documents[b] == d
                text = tokenizer.decode(original[b][at].tolist(), skip_special_tokens=True)
                patterns.setdefault(text, set()).add(tuple(pick[b][at].tolist()))
                pieces = tokenizer.convert_ids_to_tokens(original[b][at].tolist())
                index = words_from_pieces(pieces, torch.isin(original[b][at], specials).tolist())
                groups: dict[int, set[bool]] = {}
                for w, p in zip(index, pick[b][at].tolist(), strict=True):
                    if w is not None:
                        groups.setdefault(w, set()).add(p)
                if whole_word:
                    assert all(len(g) == 1 for g in groups.values())  # every piece of a word, or none
                    words += len(groups)
                    chosen_words += sum(True in g for g in groups.values())
                first_words.append(True in groups[0])
            for a, c in zip(first_words, first_words[1:], strict=False):
                shared, differ = shared + (a and c), differ + (a != c)
    assert tokens > 3000
    rate = chosen_words / words if whole_word else chosen / tokens
    assert abs(rate - 0.15) <= 0.03
    assert abs(masked / chosen - 0.8) <= 0.06 and abs(kept / chosen - 0.1) <= 0.05
    assert differ > 0 and shared < differ  # the windows of a row draw their words independently
    assert all(len(seen) > 1 for seen in patterns.values())  # dynamic: every copy masked anew


def test_packing_refuses_a_model_whose_attention_would_mix_documents(tmp_path, minilm):
    """No masked-LM family is such today; an encoder with a sliding window (or a relative position
    bias, or prompt tuning's virtual tokens) would be: one line naming the family and the fix."""
    model = load_model(tiny_folder(tmp_path, minilm, "bert"), task="masked-lm")
    model.body.config = dataclasses.replace(model.body.config, sliding_window=4)
    with pytest.raises(GraftError) as e:
        check_packable(model.body, "mlm.yaml")
    assert str(e.value) == (
        "mlm.yaml: pretrain.pack: a bert model's attention would mix the documents packed in a row"
        " (relative positions, a sliding window or virtual tokens); set pretrain.pack=false"
    )


def test_graft_train_fine_tunes_a_masked_lm_task(cli, tmp_path, minilm):
    """task.name: masked-lm in an ordinary recipe: dynamic masks per batch, evaluated as masked-token perplexity."""
    base = tiny_folder(tmp_path, minilm, "bert")
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 4))
    recipe = {
        "model": {"path": str(base)},
        "data": {"train": str(data), "val_fraction": 0.25, "max_length": 16},
        "task": {"name": "masked-lm"},
        "optim": {"lr": 1e-3},
        "train": {"output": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "plots": False},
        "eval": {"metric": "perplexity"},
    }
    path = tmp_path / "mlm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = json.loads(cli("train", path, "-q").ok().stdout.splitlines()[-1])
    # masked tokens of the held-out lines, scored: a random model's perplexity is near the vocabulary's size
    assert result["eval/tokens"] > 0 and 1 < result["eval/perplexity"] < 2 * 30522
    models = [p.parent for p in (tmp_path / "run").rglob("config.json")]
    assert models and all(
        type(transformers.AutoModelForMaskedLM.from_pretrained(m)) is transformers.BertForMaskedLM
        for m in models
    )


@pytest.mark.parametrize("family", MASKED_LM)
def test_training_runs_the_head_at_masked_positions_only_with_the_same_loss_and_gradients(
    family, tmp_path, minilm
):
    """In training the masked-LM head projects only the masked positions onto the vocabulary (N, V):
    the loss and every parameter's gradient equal those of the full (B, T, V) logits."""
    tokenizer = Tokenizer.from_folder(minilm)
    model = load_model(tiny_folder(tmp_path, minilm, family), task="masked-lm", mask_probability=0.3)
    batch = next(mlm_batches(iter([LONG, *LINES]), model.head, tokenizer, batch_size=4, max_length=32))
    masked = int((batch["labels"] != IGNORE).sum())
    model.train()
    torch.manual_seed(0)  # both passes draw the body's same dropout masks (the head has none)
    out = model(**batch)
    assert out.logits.shape == (masked, model.config.vocab_size)
    out.loss.backward()
    rows = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the same training pass, the head given no labels: every position's logits, (B, T, V)
    torch.manual_seed(0)
    logits = model.head(model.body(**body_inputs(model.head, batch)), {})
    assert logits.shape[:-1] == batch["labels"].shape
    assert (logits[batch["labels"] != IGNORE] - out.logits).abs().max() <= TOL
    loss = model.head.loss(logits, batch["labels"], batch)
    assert abs(loss - out.loss) <= TOL
    loss.backward()
    full = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(full) == set(rows)
    for name, grad in full.items():
        assert (grad - rows[name]).abs().max() <= TOL, name
