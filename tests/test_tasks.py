"""Task heads on every family that has them: forward/backward, HF task checkpoints both ways, and the
collation / post-processing of each task (word pieces -> words -> entities, windows -> answers)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_hf_config

from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.tasks import HEADS, TaskModel
from graft.tasks.collate import pad
from graft.tasks.token_classification import IGNORE
from graft.tokenizer import Tokenizer

TOL = 1e-5
# every task a family declares in its architectures -> the transformers class of its checkpoints
HF_CLASSES = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "question-answering": transformers.AutoModelForQuestionAnswering,
    "masked-lm": transformers.AutoModelForMaskedLM,
}
LABELS = ["negative", "neutral", "positive"]
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]


def families_with(task: str) -> list[str]:
    return sorted(name for name, f in FAMILIES.items() if task in f.architectures and f.inputs == "tokens")


def hf_task_model(family: str, task: str, **config):
    """A random tiny transformers task model, with non-trivial biases and norms."""
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    if cfg.pad_token_id is None:  # transformers finds a decoder's last token by the pad id
        cfg.pad_token_id = 0
    for key, value in config.items():
        setattr(cfg, key, value)
    model = HF_CLASSES[task].from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def task_options(task: str) -> dict:
    if task == "classification":
        return {"id2label": dict(enumerate(LABELS)), "label2id": {x: i for i, x in enumerate(LABELS)}}
    if task == "token-classification":
        return {"id2label": dict(enumerate(TAGS)), "label2id": {x: i for i, x in enumerate(TAGS)}}
    return {}


def graft_logits(model: TaskModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def hf_logits(model, task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    if task == "question-answering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)  # graft's (B, T, 2)
    return out.logits


def on_real_tokens(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()] if logits.dim() == 3 else logits


CASES = [(task, family) for task in HF_CLASSES for family in families_with(task)]


def test_every_task_a_family_declares_has_a_transformers_class_here():
    """A family that gains a task (its architectures) fails here until the round trip below covers it."""
    # seq2seq: tests/test_seq2seq_families.py round-trips it for every encoder-decoder family
    declared = {task for f in FAMILIES.values() if f.inputs == "tokens" for task in f.architectures} - {
        "base",
        "seq2seq",
    }
    assert declared == set(HF_CLASSES)


@pytest.mark.parametrize(("task", "family"), CASES)
def test_hf_task_checkpoint_round_trip(task, family, tmp_path):
    """HF checkpoint -> graft: same logits; graft -> HF: same logits, same labels, no missing tensors."""
    ref = hf_task_model(family, task, **task_options(task))
    ref.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert isinstance(model, TaskModel) and model.task == task
    ids, mask = padded_batch()
    expected = on_real_tokens(hf_logits(ref, task, ids, mask), mask)
    assert expected.abs().max() > 0.01
    assert (on_real_tokens(graft_logits(model, ids, mask), mask) - expected).abs().max() <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())

    save_model(model, tmp_path / "graft")
    again, info = HF_CLASSES[task].from_pretrained(tmp_path / "graft", output_loading_info=True)
    assert type(again) is type(ref)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert again.config.id2label == ref.config.id2label
    got = on_real_tokens(hf_logits(again.eval(), task, ids, mask), mask)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize(
    "problem_type", ["single_label_classification", "multi_label_classification", "regression"]
)
def test_classification_loss_equals_transformers(family, problem_type, tmp_path):
    num_labels = 1 if problem_type == "regression" else 3
    ref = hf_task_model(family, "classification", num_labels=num_labels, problem_type=problem_type)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.head.problem_type == problem_type.removesuffix("_classification")
    ids, mask = padded_batch()
    labels = {
        "single_label_classification": torch.tensor([0, 2, 1]),
        "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0]]),
        "regression": torch.tensor([0.5, -1.0, 2.0]),
    }[problem_type]
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(expected.item() - got.item()) <= TOL
    assert model.head.count(labels, {}) == 3


def test_token_classification_and_qa_losses_equal_transformers(tmp_path):
    ids, mask = padded_batch()
    ref = hf_task_model("bert", "token-classification", **task_options("token-classification"))
    ref.save_pretrained(tmp_path / "ner")
    model = load_model(tmp_path / "ner")
    labels = torch.randint(0, len(TAGS), ids.shape).masked_fill(mask == 0, IGNORE)
    labels[0, :3] = IGNORE
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(expected.item() - got.item()) <= TOL
    assert model.head.count(labels, {}) == int(mask.sum()) - 3

    ref = hf_task_model("bert", "question-answering")
    ref.save_pretrained(tmp_path / "qa")
    model = load_model(tmp_path / "qa")
    mask = torch.ones_like(mask)  # the softmax runs over padding too (as in transformers): compare without
    spans = torch.tensor([[1, 3], [2, 2], [0, 0]])
    with torch.no_grad():
        expected = ref(
            input_ids=ids, attention_mask=mask, start_positions=spans[:, 0], end_positions=spans[:, 1]
        ).loss
        got = model(input_ids=ids, attention_mask=mask, labels=spans).loss
    assert abs(expected.item() - got.item()) <= TOL


# every head of the registry on the families that have it: the embedding head sits on any body,
# the others where the family declares the task (the LM head on the decoders)
HEAD_CASES = [
    (task, family)
    # seq2seq trains on its encoder-decoders in test_seq2seq_training.py (with decoder inputs: not these
    # batches); images: test_vit
    for task in sorted(t for t, head in HEADS.items() if head.inputs == "tokens" and t != "seq2seq")
    # embedding: every single-stack family (an encoder-decoder takes seq2seq only: test_seq2seq_families.py)
    for family in (
        sorted(n for n, f in FAMILIES.items() if not f.encoder_decoder and f.inputs == "tokens")
        if task == "embedding"
        else families_with(task)
    )
]


def test_every_registered_head_has_a_case():
    """A head added to graft.tasks.HEADS fails here until it trains on some family below."""
    assert {task for task, _ in HEAD_CASES} == {
        t for t, head in HEADS.items() if head.inputs == "tokens" and t != "seq2seq"
    }


def fake_labels(task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if task == "causal-lm":
        return ids.masked_fill(mask == 0, IGNORE)  # each real token is the next one's target
    if task == "masked-lm":
        return ids.masked_fill(mask == 0, IGNORE)  # every real token is a target
    if task == "classification":
        return torch.tensor([0, 2, 1])
    if task == "token-classification":
        return torch.randint(0, len(TAGS), ids.shape).masked_fill(mask == 0, IGNORE)
    if task == "question-answering":
        return torch.tensor([[1, 3], [2, 2], [0, 0]])
    if task == "embedding":
        return torch.arange(ids.shape[0] // 2)  # rows B.. are the pairs of rows ..B
    raise AssertionError(f"no labels for task {task!r}: add its case here")


@pytest.mark.parametrize(("task", "family"), HEAD_CASES)
def test_head_forward_backward_on_a_base_model(task, family, tmp_path):
    """A base checkpoint + a new head trains: finite loss, a gradient on every trainable parameter."""
    cfg = tiny_hf_config(family)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path)
    options = {"classification": {"num_labels": 3}, "token-classification": {"id2label": TAGS}}.get(task, {})
    model = load_model(tmp_path, task=task, **options)
    assert isinstance(model, TaskModel) and model.task == task
    model.train()
    ids, mask = padded_batch()
    if task == "embedding":
        ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])
    labels = fake_labels(task, ids, mask)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.head.count(labels, {}) > 0


def test_a_new_head_initializes_and_saves(tmp_path):
    """Fine-tuning starts from a base model: the head is new, the labels come from the caller."""
    cfg = tiny_hf_config("bert")
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", task="classification", id2label=LABELS)
    assert model.head.id2label == LABELS
    save_model(model, tmp_path / "clf")
    again = load_model(tmp_path / "clf")
    assert again.task == "classification" and again.head.id2label == LABELS
    ids, mask = padded_batch()
    assert torch.equal(graft_logits(model, ids, mask), graft_logits(again, ids, mask))


def test_a_head_with_the_wrong_number_of_labels_is_a_clear_error(tmp_path):
    ref = hf_task_model("bert", "classification", **task_options("classification"))
    ref.save_pretrained(tmp_path)
    with pytest.raises(GraftError, match=r"classifier.weight.*shape \(3, 32\).*expects \(5, 32\)"):
        load_model(tmp_path, id2label=["a", "b", "c", "d", "e"])


def test_decoder_classification_reads_the_last_real_token_with_left_or_right_padding(tmp_path):
    ref = hf_task_model("gpt2", "classification", **task_options("classification"))
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    right_ids, right_mask = padded_batch("right")
    left_ids, left_mask = padded_batch("left")
    # the same real tokens, moved to the right end of each row
    for i in range(3):
        n = int(right_mask[i].sum())
        left_ids[i, 9 - n :] = right_ids[i, :n]
    got_right = graft_logits(model, right_ids, right_mask)
    positions = (left_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got_left = model(input_ids=left_ids, attention_mask=left_mask, position_ids=positions).logits
    assert (got_right - got_left).abs().max() <= TOL


def test_embedding_head_saves_as_the_bare_model_and_comes_back(tmp_path):
    cfg = tiny_hf_config("bert")
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", task="embedding", pooling="cls")
    save_model(model, tmp_path / "emb")
    again = load_model(tmp_path / "emb")
    assert again.task == "embedding" and again.head.pooling == "cls"
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "emb")) is transformers.BertModel
    ids, mask = padded_batch()
    vectors = graft_logits(again, ids, mask)
    assert vectors.shape == (3, 32) and torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    assert torch.equal(vectors, graft_logits(model, ids, mask))
    assert "embedding" in HEADS


def test_pad_fills_either_side_and_masks_the_real_tokens():
    rows = [[5, 6, 7], [8], []]
    ids, mask = pad(rows, IGNORE)
    assert ids.tolist() == [[5, 6, 7], [8, IGNORE, IGNORE], [IGNORE] * 3]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad(rows, 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


# ---- collation and post-processing on a real tokenizer (all-MiniLM-L6-v2's WordPiece) ----
def tiny_body(family: str = "bert", vocab_size: int = 30522):
    """A random graft body with the real tokenizer's vocabulary size."""
    from graft.nn import Transformer

    hf = tiny_hf_config(family).to_dict() | {"vocab_size": vocab_size}
    torch.manual_seed(0)
    return Transformer(FAMILIES[family].config_from_hf(hf)).eval()


@pytest.fixture(scope="module")
def wordpiece(minilm) -> Tokenizer:
    return Tokenizer.from_folder(minilm)


WORDS = ["Shahin", "Siadati", "joined", "HuggingFace", "Inc.", "in", "Reykjavik", "."]
GOLD = ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "O", "O"]


def logits_on_first_pieces(batch: dict, tags_per_row: list[list[str]], tags: list[str]) -> torch.Tensor:
    """Logits that pick each word's tag on its first piece, and a wrong tag on every other piece."""
    B, T = batch["input_ids"].shape
    logits = torch.zeros(B, T, len(tags))
    logits[..., tags.index("B-ORG")] = 5.0  # what the other pieces (and special tokens) say
    for i, row in enumerate(tags_per_row):
        seen = set()
        for position, word in enumerate(batch["word_ids"][i]):
            if word is not None and word not in seen:
                seen.add(word)
                logits[i, position] = 0.0
                logits[i, position, tags.index(row[word])] = 9.0
    return logits


def test_ner_labels_sit_on_the_first_piece_of_each_word(wordpiece):
    body = tiny_body()
    model = TaskModel(body, HEADS["token-classification"](body, id2label=TAGS))
    batch = model.head.collate([{"tokens": WORDS, "tags": GOLD}], wordpiece)
    pieces = wordpiece.convert_ids_to_tokens(batch["input_ids"][0])
    assert pieces[1:6] == ["shah", "##in", "si", "##ada", "##ti"]  # words split into several pieces
    labelled = {pieces[p]: TAGS[int(label)] for p, label in enumerate(batch["labels"][0]) if label != IGNORE}
    assert labelled == {
        "shah": "B-PER",
        "si": "I-PER",
        "joined": "O",
        "hugging": "B-ORG",
        "inc": "I-ORG",
        "in": "O",
        "reykjavik": "O",
        ".": "O",
    }
    assert model.head.count(batch["labels"], batch) == len(WORDS)
    out = model(**batch)
    assert out.logits.shape == (1, len(pieces), len(TAGS)) and torch.isfinite(out.loss)


def test_ner_predictions_map_back_to_words_and_character_spans(wordpiece):
    body = tiny_body()
    head = HEADS["token-classification"](body, id2label=TAGS)
    batch = head.collate([{"tokens": WORDS, "tags": GOLD}], wordpiece)
    [pred] = head.postprocess(logits_on_first_pieces(batch, [GOLD], TAGS), batch)
    assert pred["tokens"] == WORDS and pred["tags"] == GOLD
    text = " ".join(WORDS)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in pred["entities"]] == [
        ("PER", "Shahin Siadati", 0, 14),
        ("ORG", "HuggingFace Inc.", 22, 38),
    ]
    assert all(text[e["start"] : e["end"]] == e["text"] for e in pred["entities"])
    assert head.evaluate([pred], [{"tokens": WORDS, "tags": GOLD}])["f1"] == 1.0


def test_ner_on_raw_text_gives_spans_into_the_text(wordpiece):
    body = tiny_body()
    head = HEADS["token-classification"](body, id2label=TAGS)
    text = "Shahin Siadati joined HuggingFace Inc. in Reykjavik."
    batch = head.collate([{"text": text}], wordpiece)
    assert "labels" not in batch
    words = batch["words"][0]
    assert words == ["Shahin", "Siadati", "joined", "HuggingFace", "Inc", ".", "in", "Reykjavik", "."]
    tags = ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "O", "B-PER", "O"]
    [pred] = head.postprocess(logits_on_first_pieces(batch, [tags], TAGS), batch)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in pred["entities"]] == [
        ("PER", "Shahin Siadati", 0, 14),
        ("ORG", "HuggingFace Inc", 22, 37),
        ("PER", "Reykjavik", 42, 51),
    ]
    assert all(0.9 < e["score"] <= 1.0 for e in pred["entities"])


FILLER = (
    "Graft is a toolkit for transfer learning. It loads pretrained transformers from folders. "
    "It trains them on small budgets with adapters and low rank updates. It measures them honestly. "
)
CONTEXT = FILLER + "The author of the book lives in Reykjavik, near the harbour. " + FILLER


def qa_head(family: str = "bert", vocab_size: int = 30522, **options):
    body = tiny_body(family, vocab_size)
    return TaskModel(body, HEADS["question-answering"](body, **options))


def answer_logits(batch: dict) -> torch.Tensor:
    """Logits that point at the labelled span of each window (the null position when it has none)."""
    rows, T = batch["input_ids"].shape
    logits = torch.zeros(rows, T, 2)
    for row, (start, end) in enumerate(batch["labels"].tolist()):
        logits[row, start, 0] = logits[row, end, 1] = 8.0
    return logits


@pytest.mark.parametrize(("family", "tokenizer"), [("bert", "wordpiece"), ("roberta", "byte_level")])
def test_qa_finds_an_answer_in_a_later_window_with_its_character_span(family, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    model = qa_head(family, tok.vocab_size, stride=8)
    start = CONTEXT.index("Reykjavik")
    record = {
        "id": "q1",
        "question": "Where does the author live?",
        "context": CONTEXT,
        "answers": {"text": ["Reykjavik"], "answer_start": [start]},
    }
    batch = model.head.collate([record], tok, max_length=40)
    rows = batch["input_ids"].shape[0]
    assert rows >= 3 and batch["example"] == [0] * rows  # one question, several windows
    with_answer = [row for row, (s, e) in enumerate(batch["labels"].tolist()) if (s, e) != (0, 0)]
    assert with_answer and 0 not in with_answer  # not in the first window
    for row in with_answer:  # the labelled tokens cover exactly the answer's characters
        s, e = batch["labels"][row].tolist()
        assert CONTEXT[batch["offsets"][row][s][0] : batch["offsets"][row][e][1]] == "Reykjavik"
    out = model(**batch)
    assert out.logits.shape == (rows, batch["input_ids"].shape[1], 2) and torch.isfinite(out.loss)

    [pred] = model.head.postprocess(answer_logits(batch), batch)
    assert (pred["answer"], pred["start"], pred["end"]) == ("Reykjavik", start, start + len("Reykjavik"))
    assert pred["answers"][0]["text"] == "Reykjavik"
    assert [a["score"] for a in pred["answers"]] == sorted(
        (a["score"] for a in pred["answers"]), reverse=True
    )
    assert model.head.evaluate([pred], [record]) == {"exact_match": 100.0, "f1": 100.0}


def test_qa_respects_max_answer_length_and_unanswerable_questions(wordpiece):
    model = qa_head(unanswerable=True)
    records = [
        {"question": "Where?", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
        {"question": "Where?", "context": CONTEXT},
    ]
    batch = model.head.collate(records, wordpiece, max_length=64)
    assert "labels" not in batch  # only some records have answers
    logits = torch.zeros(len(batch["example"]), batch["input_ids"].shape[1], 2)
    first = batch["example"].index(1)
    context_tokens = [t for t, o in enumerate(batch["offsets"][first]) if o is not None]
    a, b = context_tokens[2], context_tokens[12]  # an 11-token span
    logits[first, a, 0] = logits[first, b, 1] = 9.0
    logits[first, a + 1, 1] = 4.0  # a short span that starts at the same token
    logits[: batch["example"].index(1), 0] = 9.0  # the first question: "no answer" wins everywhere
    no_answer, answered = model.head.postprocess(logits, batch, max_answer_length=5)
    assert no_answer["answer"] == "" and no_answer["start"] is None
    offsets = batch["offsets"][first]
    assert (answered["start"], answered["end"]) == (
        offsets[a][0],
        offsets[a + 1][1],
    )  # the long span is too long
    [long] = model.head.postprocess(
        logits[first : first + 1],
        {**batch, "example": [0], "offsets": [offsets], "null_index": [0]},
        max_answer_length=30,
    )
    assert (long["start"], long["end"]) == (offsets[a][0], offsets[b][1])


def test_classification_collate_postprocess_and_evaluate(wordpiece):
    body = tiny_body()
    model = TaskModel(body, HEADS["classification"](body, id2label=LABELS))
    records = [
        {"text": "A fine film.", "label": "positive"},
        {"text": "It was a film.", "label": "neutral"},
        {"text": "Awful.", "label": "negative"},
    ]
    batch = model.head.collate(records, wordpiece)
    assert batch["labels"].tolist() == [2, 1, 0]
    pairs = model.head.collate([{"text": "It was a film.", "text_pair": "Or was it?"}], wordpiece)
    assert int(pairs["token_type_ids"][0].max()) == 1 and "labels" not in pairs  # the pair is segment 1
    out = model(**batch)
    assert torch.isfinite(out.loss)
    logits = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0]])
    preds = model.head.postprocess(logits, batch)
    assert [p["label"] for p in preds] == ["positive", "neutral", "neutral"]
    assert abs(sum(preds[0]["scores"].values()) - 1.0) < 1e-6
    metrics = model.head.evaluate(preds, records)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == {"labels": LABELS, "matrix": [[0, 1, 0], [0, 1, 0], [0, 0, 1]]}
    with pytest.raises(GraftError, match="record 2: label 'great'"):
        model.head.collate([records[0], {"text": "x", "label": "great"}], wordpiece)


def test_multi_label_and_regression_collate(wordpiece):
    body = tiny_body()
    head = HEADS["classification"](body, id2label=LABELS, problem_type="multi_label")
    batch = head.collate(
        [{"text": "a", "label": ["negative", "positive"]}, {"text": "b", "label": []}], wordpiece
    )
    assert batch["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    [pred] = head.postprocess(torch.tensor([[2.0, -2.0, 0.5]]), batch)
    assert pred["labels"] == ["negative", "positive"]
    head = HEADS["classification"](tiny_body(), problem_type="regression")
    batch = head.collate([{"text": "a", "label": 0.5}, {"text": "b", "label": "2"}], wordpiece)
    assert batch["labels"].tolist() == [0.5, 2.0]
    assert head.postprocess(torch.tensor([[1.5]]), batch) == [{"value": 1.5}]


def test_contrastive_embedding_batch_and_retrieval_metrics(wordpiece):
    body = tiny_body()
    model = TaskModel(body, HEADS["embedding"](body))
    records = [{"text": f"question {i}", "text_pair": f"answer {i}"} for i in range(4)]
    batch = model.head.collate(records, wordpiece)
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].tolist() == [0, 1, 2, 3]
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    preds = model.head.postprocess(out.logits, batch)
    # identical text and pair vectors retrieve each other perfectly
    perfect = [{"embedding": p["embedding"], "pair_embedding": p["embedding"]} for p in preds]
    assert model.head.evaluate(perfect, records) == {"accuracy_at_1": 1.0, "mrr": 1.0}


def test_instruction_data_masks_the_prompt_out_of_the_lm_loss(wordpiece):
    body = tiny_body("gpt2")
    model = TaskModel(body, HEADS["causal-lm"](body))
    records = [
        {"text": "Translate: good morning", "text_pair": "buenos dias"},
        {"text": "plain text to learn"},
    ]
    batch = model.head.collate(records, wordpiece)
    prompt = wordpiece.encode("Translate: good morning", padding=False, return_tensors=None).input_ids[0]
    labels = batch["labels"][0].tolist()
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    response = wordpiece.encode("buenos dias", add_special_tokens=False, return_tensors=None).input_ids[0]
    assert labels[len(prompt) : len(prompt) + len(response)] == response
    assert (
        batch["labels"][1][batch["attention_mask"][1] == 1].tolist()
        == batch["input_ids"][1][batch["attention_mask"][1] == 1].tolist()
    )
    out = model(**batch)
    preds = model.head.postprocess(out.logits, batch)
    assert preds[0]["tokens"] == len(response)  # only the response is scored
    total = sum(p["nll"] for p in preds) / sum(p["tokens"] for p in preds)
    assert abs(total - out.loss.item()) < 1e-4
    assert model.head.evaluate(preds, records)["perplexity"] > 1


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """A small byte-level BPE tokenizer with RoBERTa's special tokens, trained here (offline)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the man joined the company in the city of the north"] * 20, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    names = dict(zip(("bos_token", "pad_token", "eos_token", "unk_token"), specials, strict=True))
    return Tokenizer(backend, {**names, "cls_token": "<s>", "sep_token": "</s>", "model_max_length": 64})


def test_ner_word_mapping_with_byte_level_pieces(byte_level):
    """RoBERTa-style pieces: words start with their space (Ġ); offsets still give exact word spans."""
    body = tiny_body("roberta", vocab_size=byte_level.vocab_size)
    head = HEADS["token-classification"](body, id2label=TAGS)
    words = ["Shahin", "Siadati", "joined", "the", "company"]
    tags = ["B-PER", "I-PER", "O", "O", "O"]
    batch = head.collate([{"tokens": words, "tags": tags}], byte_level)
    pieces = byte_level.convert_ids_to_tokens(batch["input_ids"][0])
    first = [p for p, label in zip(pieces, batch["labels"][0].tolist(), strict=True) if label != IGNORE]
    # untrained names fall apart into a lone space piece and letters; the word starts at its first letter
    assert pieces[:8] == ["<s>", "S", "h", "a", "h", "in", "Ġ", "S"]
    assert first == ["S", "S", "Ġjoined", "Ġthe", "Ġcompany"]
    [pred] = head.postprocess(logits_on_first_pieces(batch, [tags], TAGS), batch)
    assert pred["tags"] == tags
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in pred["entities"]] == [
        ("PER", "Shahin Siadati", 0, 14)
    ]


@pytest.mark.parametrize("as_text", [False, True])
def test_ner_on_a_sentence_longer_than_the_window(wordpiece, as_text):
    """Windows overlap by a stride; every word gets its tag, read from the window where it has most context."""
    body = tiny_body()
    head = HEADS["token-classification"](body, id2label=TAGS, stride=6)
    words = (WORDS[:-1] * 8) + ["."]  # 57 words, 97 pieces
    gold = (GOLD[:-1] * 8) + ["O"]
    record = {"text": " ".join(words)} if as_text else {"tokens": words, "tags": gold}
    batch = head.collate([record], wordpiece, max_length=24)
    rows = batch["input_ids"].shape[0]
    assert rows >= 5 and batch["example"] == [0] * rows
    if as_text:
        words = batch["words"][0]  # the tokenizer splits "Inc." into two words
        gold = [
            t
            for w, t in zip(WORDS[:-1], GOLD[:-1], strict=True)
            for t in ([t, "I-ORG"] if w == "Inc." else [t])
        ]
        gold = gold * 8 + ["O"]
        assert len(words) == len(gold)
    else:
        labelled = {w for first in batch["firsts"] for w in first}
        assert labelled == set(range(len(words)))  # each word is labelled in some window
        assert int((batch["labels"] != IGNORE).sum()) > len(words)  # ... and in the overlaps twice
    # logits: each window's own first pieces say the gold tag
    tags_per_row = [gold] * rows
    logits = torch.zeros(rows, batch["input_ids"].shape[1], len(TAGS))
    logits[..., TAGS.index("B-ORG")] = 5.0
    for row, first in enumerate(batch["firsts"]):
        for word, position in first.items():
            logits[row, position] = 0.0
            logits[row, position, TAGS.index(tags_per_row[row][word])] = 9.0
    [pred] = head.postprocess(logits, batch)
    assert pred["tags"] == gold
    text = batch["texts"][0]
    assert len(pred["entities"]) == 16
    assert all(text[e["start"] : e["end"]] == e["text"] for e in pred["entities"])
    assert {e["text"] for e in pred["entities"]} == {"Shahin Siadati", "HuggingFace Inc."}


# --- labels when reading data for predict / eval (issue 12, fault 9) ----------------------------


def labelled_csv(path, rows: int, bad_row: int, bad_label: str = "postive"):
    """A CSV of ``rows`` rows; data row ``bad_row`` (from 1) has ``bad_label``, the rest a model label."""
    lines = ["text,label"] + [
        f"text {i},{bad_label if i == bad_row else LABELS[i % 3]}" for i in range(1, rows + 1)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_eval_names_the_file_and_line_of_an_unknown_label_and_suggests_one(tmp_path):
    from graft.data import load_records
    from graft.tasks.collate import record_options

    head = HEADS["classification"](tiny_body(), id2label=LABELS)
    path = labelled_csv(tmp_path / "test.csv", rows=60, bad_row=50)  # in the second batch of 32
    with pytest.raises(GraftError) as error:
        list(load_records(path, **record_options(head, labelled=True)))
    assert str(error.value) == (
        f"{path}, line 51, column 'label': label 'postive' is not one of the model's labels "
        "(known: negative, neutral, positive); did you mean 'positive'?"
    )
    stream = load_records(path, skip_bad_rows=True, **record_options(head, labelled=True))
    assert len(list(stream)) == 59 and stream.stats.skipped == {"unknown label": 1}


def test_eval_needs_a_label_column_and_says_how_to_name_one(tmp_path):
    from graft.data import load_records
    from graft.tasks.collate import record_options

    head = HEADS["classification"](tiny_body(), id2label=LABELS)
    path = tmp_path / "test.csv"
    path.write_text("text,gold\nfine,positive\n", encoding="utf-8")
    with pytest.raises(GraftError) as error:
        list(load_records(path, **record_options(head, labelled=True)))
    assert str(error.value) == (
        f"{path}, line 1, column 'label': no such column (available: 'text', 'gold'); "
        "name it with --column COL=label (data.columns: {COL: label} in a recipe)"
    )


def test_predict_reads_no_labels(tmp_path):
    from graft.data import load_records
    from graft.tasks.collate import record_options

    head = HEADS["classification"](tiny_body(), id2label=LABELS)
    path = labelled_csv(tmp_path / "in.csv", rows=3, bad_row=2, bad_label="")  # unknown and even empty
    records = list(load_records(path, **record_options(head, labelled=False)))
    assert records == [{"text": "text 1"}, {"text": "text 2"}, {"text": "text 3"}]
    regression = HEADS["classification"](tiny_body(), num_labels=1, problem_type="regression")
    path.write_text("text,score\na,not a number\n", encoding="utf-8")
    assert list(load_records(path, columns={"score": "label"}, **record_options(regression, False))) == [
        {"text": "a"}
    ]


def test_predict_reads_a_conll_file_without_tags_and_eval_checks_its_tags(tmp_path):
    from graft.data import load_records
    from graft.tasks.collate import record_options

    head = HEADS["token-classification"](tiny_body(), id2label=TAGS)
    path = tmp_path / "in.conll"
    path.write_text("Ann B-PER\nsmiled O\n\nBob B-LOC\n", encoding="utf-8")
    assert list(load_records(path, **record_options(head, labelled=False))) == [
        {"tokens": ["Ann", "smiled"]},
        {"tokens": ["Bob"]},
    ]
    with pytest.raises(GraftError) as error:
        list(load_records(path, **record_options(head, labelled=True)))
    assert str(error.value) == (
        f"{path}, line 4, column 'tags': label 'B-LOC' is not one of the model's labels "
        "(known: O, B-PER, I-PER, B-ORG, I-ORG); did you mean 'B-ORG'?"
    )


def test_collate_names_an_unknown_label_with_the_known_ones(wordpiece):
    head = HEADS["classification"](tiny_body(), id2label=LABELS)
    with pytest.raises(GraftError) as error:
        head.collate([{"text": "a", "label": "positive"}, {"text": "b", "label": "Neutral"}], wordpiece)
    assert str(error.value) == (
        "record 2: label 'Neutral' is not one of the model's labels (known: negative, neutral, positive); "
        "did you mean 'neutral'?"
    )


def test_predict_and_eval_at_the_command_line_name_file_and_line_and_skip_bad_rows(tmp_path, minilm, cli):
    from test_predict_cli import task_folder

    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    data = labelled_csv(tmp_path / "test.csv", rows=60, bad_row=50)
    line = cli("eval", folder, "--data", data).error_line()
    assert line == (
        f"error: {data}, line 51, column 'label': label 'postive' is not one of the model's labels "
        "(known: negative, neutral, positive); did you mean 'positive'?"
    )
    result = cli("predict", folder, "--input", data).ok()  # predict needs no labels, so ignores them
    assert len(result.stdout.splitlines()) == 60

    for command in (["eval", folder, "--data", data], ["predict", folder, "--input", data]):
        result = cli(*command, "--skip-bad-rows").ok()
        skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
        if command[0] == "predict":
            assert not skipped and len(result.stdout.splitlines()) == 60
            continue
        assert skipped == [
            f"skipped 1 bad rows of {data} (first: line 51, column 'label': label 'postive' is not one of "
            "the model's labels (known: negative, neutral, positive); did you mean 'positive'?); "
            "1 unknown label; kept 59 rows"
        ]
        assert '"examples": 59' in result.stdout
    line = cli("predict", folder, "--input", data, "--encoding", "klingon").error_line()
    assert line.startswith("error: encoding: 'klingon' is not a text encoding") and "--encoding" in line
