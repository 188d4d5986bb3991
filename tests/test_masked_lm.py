"""The masked-lm head: every family with a transformers *ForMaskedLM class matches it, keeps its
pretrained head when loaded, and saves a checkpoint transformers loads."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_hf_config

from graft.data.masking import mask_tokens, word_tensor, words_from_pieces
from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.tasks import HEADS, TaskModel
from graft.tasks.hf_layout import HF_MLM_HEADS
from graft.tokenizer import Tokenizer

TOL = 1e-5
MLM_FAMILIES = sorted(name for name, f in FAMILIES.items() if "masked-lm" in f.architectures)
# two-stack families are refused every task but their own by load_model, before any head (their own
# tests: encoder-decoders take seq2seq, CLIP image-text)
OTHERS = sorted(
    name
    for name, f in FAMILIES.items()
    if "masked-lm" not in f.architectures and not f.encoder_decoder and not f.dual_encoder
)


def hf_mlm(family: str) -> transformers.PreTrainedModel:
    """A random tiny *ForMaskedLM with non-trivial biases and norms (its MLM head's too)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(tiny_hf_config(family), attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=[False, True], ids=["reference", "kernels"])
def kernels(request) -> bool:
    return request.param


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every third real token is in the loss."""
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return labels.masked_fill(mask == 0, -100)


def test_the_registry_declares_every_transformers_mlm_family():
    assert MLM_FAMILIES == ["albert", "bert", "distilbert", "roberta"]
    assert "masked-lm" in HEADS


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_masked_lm_logits_and_loss_match_transformers(family, tmp_path, kernels):
    ref = hf_mlm(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    assert isinstance(model, TaskModel) and model.task == "masked-lm"
    ids, mask = padded_batch()
    labels = labels_for(ids, mask)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert expected.logits.abs().max() > 0.1  # not a degenerate comparison
    assert (expected.logits[keep] - got.logits[keep]).abs().max() <= TOL
    assert abs(expected.loss.item() - got.loss.item()) <= TOL
    assert model.head.count(labels, {}) == int((labels != -100).sum())


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_pretrained_mlm_head_is_kept_and_saved_for_transformers(family, tmp_path, caplog):
    ref = hf_mlm(family)
    ref.save_pretrained(tmp_path / "ref")
    with caplog.at_level(logging.INFO, logger="graft"):
        model = load_model(tmp_path / "ref", kernels=False)
    assert not [r for r in caplog.records if "masked-lm head" in r.getMessage()]  # loaded, not new
    assert model.head.decoder.weight is model.body.embed.tokens.weight  # tied, as in transformers
    save_model(model, tmp_path / "graft")
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "graft").eval()
    assert type(again) is type(ref)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name  # every tensor, head included
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (
            again(input_ids=ids, attention_mask=mask).logits
            - model(input_ids=ids, attention_mask=mask).logits
        )
    assert diff[mask.bool()].abs().max() <= TOL


def test_a_base_checkpoint_gets_a_new_head_said_once(minilm, caplog):
    with caplog.at_level(logging.INFO, logger="graft"):
        model = load_model(minilm, task="masked-lm", to_train=True)
    said = [r.getMessage() for r in caplog.records if "masked-lm head" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        "no masked-lm head in this checkpoint; a new one is initialized to train"
    )
    assert model.body.pooler is None  # BertForMaskedLM has no pooler
    assert torch.equal(model.head.decoder.bias, torch.zeros(model.config.vocab_size))


@pytest.mark.parametrize("family", OTHERS)
def test_families_without_a_masked_lm_class_refuse_the_task(family, tmp_path):
    config = tiny_hf_config(family)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(GraftError) as e:
        load_model(tmp_path, task="masked-lm")
    assert str(e.value) == (
        f"a {family} model has no masked-lm head (families with one: albert, bert, distilbert, roberta)"
    )


# ---- dynamic masking: 80/10/10, whole words, specials never masked ----
MASK, VOCAB = 4, 1000


def synthetic_batch(rows: int = 256, width: int = 128, seed: int = 0):
    """(ids, maskable, words): random ids >= 5 with [CLS]/[SEP] at the ends, rows padded to random
    lengths, and words of 1 to 4 pieces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, width), generator=g)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    real = torch.arange(width)[None, :] < lengths[:, None]  # (B, T)
    special = torch.zeros(rows, width, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(rows), lengths - 1] = True
    ids = ids.masked_fill(special, 2).masked_fill(~real, 0)
    maskable = real & ~special
    starts = (torch.randint(0, 3, (rows, width), generator=g) == 0) & maskable  # a word starts here
    words = (starts.cumsum(1) - 1).clamp(min=0).masked_fill(~maskable, -1)
    return ids, maskable, words


def test_masking_rates_on_a_fixed_seed():
    ids, maskable, _ = synthetic_batch()
    inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, torch.Generator().manual_seed(0), 0.15)
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])  # labels: the original ids, only where chosen
    assert torch.equal(inputs[~chosen], ids[~chosen])  # everything else untouched
    n = int(chosen.sum())
    # ~24,000 maskable tokens: the rate's standard deviation is 0.0023, the tolerance over 4 of them
    assert abs(n / int(maskable.sum()) - 0.15) <= 0.01
    masked = int((inputs[chosen] == MASK).sum()) / n
    kept = int((inputs[chosen] == ids[chosen]).sum()) / n
    swapped = 1 - masked - kept
    # ~3,600 chosen tokens: standard deviations 0.007 (80%) and 0.005 (10%), tolerances over 3 of them
    assert abs(masked - 0.8) <= 0.025 and abs(kept - 0.1) <= 0.02 and abs(swapped - 0.1) <= 0.02
    assert int(inputs.max()) < VOCAB


@pytest.mark.parametrize("whole_word", [False, True])
def test_special_tokens_and_padding_are_never_masked(whole_word):
    ids, maskable, words = synthetic_batch()
    for seed in range(5):
        inputs, labels = mask_tokens(
            ids,
            maskable,
            MASK,
            VOCAB,
            torch.Generator().manual_seed(seed),
            0.5,
            words if whole_word else None,
        )
        assert (labels[~maskable] == -100).all()
        assert torch.equal(inputs[~maskable], ids[~maskable])


def test_whole_words_are_masked_all_or_none():
    ids, maskable, words = synthetic_batch()
    inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, torch.Generator().manual_seed(0), 0.15, words)
    chosen = labels != -100
    per_word = {}
    for row in range(ids.shape[0]):
        for t in maskable[row].nonzero().flatten().tolist():
            per_word.setdefault((row, int(words[row, t])), set()).add(bool(chosen[row, t]))
    assert all(len(states) == 1 for states in per_word.values())  # every piece of a word alike
    groups = sum(1 for states in per_word.values() if True in states)
    assert any(len(words[r][words[r] == w]) > 1 for r, w in list(per_word)[:50])  # multi-piece words exist
    # ~8,000 words: the chosen share's standard deviation is 0.004, the tolerance 3 of them
    assert abs(groups / len(per_word) - 0.15) <= 0.012


def test_masks_are_reproducible_from_the_seed_and_change_with_it():
    ids, maskable, words = synthetic_batch(rows=8)

    def draw(seed):
        return mask_tokens(ids, maskable, MASK, VOCAB, torch.Generator().manual_seed(seed), 0.15, words)

    assert all(torch.equal(a, b) for a, b in zip(draw(3), draw(3), strict=True))
    assert not torch.equal(draw(3)[1], draw(4)[1])


def test_a_bad_probability_is_one_line():
    ids, maskable, _ = synthetic_batch(rows=2)
    with pytest.raises(
        GraftError, match=r"^masking: probability must be between 0 and 1 \(exclusive\), found 1.5$"
    ):
        mask_tokens(ids, maskable, MASK, VOCAB, torch.Generator(), 1.5)


def test_wordpiece_continuations_group_like_the_tokenizers_word_ids(minilm):
    tokenizer = Tokenizer.from_folder(minilm)
    enc = tokenizer.encode("Unbelievably, the tokenizer splits Shakespearean words.", return_tensors=None)
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids[0])
    assert any(p.startswith("##") for p in pieces)
    assert words_from_pieces(pieces, [bool(s) for s in enc.special_tokens_mask[0]]) == enc.word_ids[0]


def test_collate_masks_each_batch_afresh_and_never_specials(minilm):
    tokenizer = Tokenizer.from_folder(minilm)
    model = load_model(minilm, task="masked-lm", to_train=True, whole_word=True, mask_probability=0.4, seed=1)
    records = [
        {"text": "Unbelievably, the tokenizer splits Shakespearean words " * 3},
        {"text": "A short one."},
    ]
    first = model.head.collate(records, tokenizer)
    second = model.head.collate(records, tokenizer)
    assert not torch.equal(first["labels"], second["labels"])  # dynamic: new masks for every batch
    enc = tokenizer.encode([r["text"] for r in records])
    special = (enc.special_tokens_mask == 1) | (enc.attention_mask == 0)
    for batch in (first, second):
        assert (batch["labels"][special] == -100).all()
        chosen = batch["labels"] != -100
        assert torch.equal(batch["labels"][chosen], enc.input_ids[chosen])
        words = word_tensor(enc.word_ids, enc.input_ids.shape[1])
        for row in range(2):  # whole words: all pieces of a word chosen alike
            for w in words[row].unique().tolist():
                if w >= 0:
                    assert len(set(chosen[row][words[row] == w].tolist())) == 1
        out = model(**batch)
        assert torch.isfinite(out.loss)
    again = load_model(minilm, task="masked-lm", whole_word=True, mask_probability=0.4, seed=1)
    assert torch.equal(again.head.collate(records, tokenizer)["input_ids"], first["input_ids"])  # seeded


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_an_old_checkpoint_with_tied_copies_loads_without_a_warning(family, tmp_path, caplog):
    """pytorch_model.bin files of BERT's time hold the decoder's weight and bias next to the tensors they
    are tied to: the copies are dropped quietly."""
    ref = hf_mlm(family)
    ref.config.architectures = [type(ref).__name__]  # as save_pretrained writes it
    ref.config.save_pretrained(tmp_path)
    state = ref.state_dict()
    assert (
        f"{HF_MLM_HEADS[family].decoder}.weight" in state and f"{HF_MLM_HEADS[family].decoder}.bias" in state
    )
    torch.save(state, tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="graft"):
        model = load_model(tmp_path, kernels=False)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (
            ref(input_ids=ids, attention_mask=mask).logits - model(input_ids=ids, attention_mask=mask).logits
        )
    assert diff[mask.bool()].abs().max() <= TOL
