"""graft.metrics against the reference packages on fixed inputs.

References (test-only dependencies): scikit-learn, scipy, seqeval, rouge-score (with nltk's
Porter stemmer), sacrebleu, and the official SQuAD v1.1 / v2.0 scripts, copied below.
"""

import math
import re
import string
import sys
from collections import Counter

import numpy as np
import pytest
import sacrebleu
import scipy.stats
import seqeval.metrics
import sklearn.metrics
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from seqeval.metrics.sequence_labeling import get_entities as seqeval_get_entities
from seqeval.metrics.sequence_labeling import precision_recall_fscore_support as seqeval_prfs

import graft.metrics as gm
from graft.errors import GraftError

TOL = dict(rel=1e-9, abs=1e-12)


def close(a, b) -> bool:
    """Equal to 1e-9, with nan equal to nan."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, **TOL)


# ---------------------------------------------------------------- classification

_rng = np.random.RandomState(0)
CLASSIFICATION = {
    "multiclass": ([0, 1, 2, 2, 1, 0, 2, 1], [0, 2, 2, 2, 1, 1, 0, 1]),
    "strings": (["cat", "dog", "dog", "bird", "cat"], ["cat", "dog", "cat", "cat", "bird"]),
    # class 3 is never predicted and class 4 never true: both hit a 0/0
    "zero-division": ([0, 1, 1, 4, 0, 4], [0, 1, 3, 3, 0, 1]),
    "binary": ([1, 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 0, 1]),
    "all-wrong": ([1, 1, 1], [0, 0, 0]),
    "random": (_rng.randint(0, 5, 200).tolist(), _rng.randint(0, 5, 200).tolist()),
}
LABELS = {None: None, "subset": [2, 0], "absent label": [0, 1, 2, 7]}


@pytest.mark.parametrize("case", CLASSIFICATION)
def test_accuracy(case):
    pred, ref = CLASSIFICATION[case]
    assert gm.accuracy(pred, ref) == pytest.approx(sklearn.metrics.accuracy_score(ref, pred), **TOL)


@pytest.mark.parametrize("zero_division", [0.0, 1.0, np.nan])
@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
@pytest.mark.parametrize("case", CLASSIFICATION)
def test_precision_recall_f1(case, average, zero_division):
    pred, ref = CLASSIFICATION[case]
    ours = gm.precision_recall_f1(pred, ref, average=average, zero_division=zero_division)
    theirs = sklearn.metrics.precision_recall_fscore_support(
        ref, pred, average=average, zero_division=zero_division
    )[:3]
    if average is None:
        labels = sorted(set(pred) | set(ref))
        assert all(list(o) == labels for o in ours)
        ours = [list(o.values()) for o in ours]
        for o, t in zip(ours, theirs, strict=True):
            assert all(close(a, b) for a, b in zip(o, t, strict=True))
    else:
        assert all(close(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("labels", ["subset", "absent label"])
@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
def test_precision_recall_f1_labels(labels, average):
    pred, ref = CLASSIFICATION["multiclass"]
    ours = gm.precision_recall_f1(pred, ref, average=average, labels=LABELS[labels])
    theirs = sklearn.metrics.precision_recall_fscore_support(
        ref, pred, average=average, labels=LABELS[labels], zero_division=0.0
    )
    if average is None:
        ours = [list(o.values()) for o in ours]
        assert np.allclose(ours, theirs[:3], rtol=1e-9, atol=0)
    else:
        assert ours == pytest.approx(theirs[:3], **TOL)


def test_binary_average():
    pred, ref = CLASSIFICATION["binary"]
    assert gm.f1(pred, ref, average="binary") == pytest.approx(sklearn.metrics.f1_score(ref, pred), **TOL)
    ours = gm.precision_recall_f1(pred, ref, average="binary", pos_label=0)
    assert ours == pytest.approx(
        sklearn.metrics.precision_recall_fscore_support(ref, pred, average="binary", pos_label=0)[:3]
    )
    with pytest.raises(GraftError, match="two classes"):
        gm.f1(*CLASSIFICATION["multiclass"], average="binary")


def test_precision_and_recall_wrappers():
    pred, ref = CLASSIFICATION["zero-division"]
    assert gm.precision(pred, ref) == pytest.approx(
        sklearn.metrics.precision_score(ref, pred, average="macro", zero_division=0.0)
    )
    assert gm.recall(pred, ref, average="weighted") == pytest.approx(
        sklearn.metrics.recall_score(ref, pred, average="weighted", zero_division=0.0)
    )


MULTILABEL_REF = _rng.randint(0, 2, (30, 4))
MULTILABEL_PRED = _rng.randint(0, 2, (30, 4))
MULTILABEL_PRED[:, 3] = 0  # a label never predicted


@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
def test_multilabel(average):
    ours = gm.precision_recall_f1(MULTILABEL_PRED, MULTILABEL_REF, average=average)
    theirs = sklearn.metrics.precision_recall_fscore_support(
        MULTILABEL_REF, MULTILABEL_PRED, average=average, zero_division=0.0
    )
    if average is None:
        ours = [list(o.values()) for o in ours]
        assert np.allclose(ours, theirs[:3], rtol=1e-9, atol=0)
    else:
        assert ours == pytest.approx(theirs[:3], **TOL)
    assert gm.accuracy(MULTILABEL_PRED, MULTILABEL_REF) == sklearn.metrics.accuracy_score(
        MULTILABEL_REF, MULTILABEL_PRED
    )


@pytest.mark.parametrize("case", ["multiclass", "strings", "zero-division"])
def test_classification_report(case):
    pred, ref = CLASSIFICATION[case]
    ours = gm.classification_report(pred, ref)
    theirs = sklearn.metrics.classification_report(ref, pred, output_dict=True, zero_division=0)
    for label in sorted(set(pred) | set(ref)):
        for row in (str(label), "macro avg", "weighted avg"):
            key = label if row == str(label) else row
            for metric in ("precision", "recall", "support"):
                assert ours[key][metric] == pytest.approx(theirs[row][metric], **TOL)
            assert ours[key]["f1"] == pytest.approx(theirs[row]["f1-score"], **TOL)
    assert ours["micro avg"]["f1"] == pytest.approx(
        theirs["accuracy"], **TOL
    )  # single-label: micro F1 = accuracy


@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("case", ["multiclass", "zero-division", "random"])
def test_confusion_matrix(case, labels, normalize):
    pred, ref = CLASSIFICATION[case]
    labels = LABELS[labels]
    if labels is not None and not set(labels) & set(ref):
        pytest.skip("sklearn refuses labels absent from the references")
    ours = gm.confusion_matrix(pred, ref, labels=labels, normalize=normalize)
    theirs = sklearn.metrics.confusion_matrix(ref, pred, labels=labels, normalize=normalize)
    assert ours.shape == theirs.shape
    assert np.allclose(ours, theirs, rtol=1e-12, atol=0)


def test_confusion_matrix_png(tmp_path):
    labels = ["cat", "dog", "bird"]
    cm = gm.confusion_matrix(*CLASSIFICATION["strings"], labels=labels)
    path = gm.confusion_matrix_png(cm, labels, tmp_path / "cm.png", title="pets")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp file left behind
    with pytest.raises(GraftError, match="4 labels"):
        gm.confusion_matrix_png(cm, labels[:2] + ["x", "y"], tmp_path / "bad.png")


def test_confusion_matrix_png_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(GraftError, match="pip install matplotlib"):
        gm.confusion_matrix_png(np.eye(2, dtype=int), ["a", "b"], tmp_path / "cm.png")


# ---------------------------------------------------------------- regression

REGRESSION = {
    "plain": ([2.5, 0.0, 2.1, 7.8, -1.0], [3.0, -0.5, 2.0, 8.0, -1.5]),
    "ties": ([1, 2, 2, 3, 3, 3, 4], [1, 1, 2, 2, 5, 3, 3]),
    "negative": ([1, 2, 3, 4, 5, 6], [6, 4, 5, 3, 1, 2]),
    "random": (_rng.randn(100).tolist(), _rng.randn(100).tolist()),
    "two items": ([0.5, 1.5], [2.0, 1.0]),
}


@pytest.mark.parametrize("case", REGRESSION)
def test_regression(case):
    pred, ref = REGRESSION[case]
    assert gm.mse(pred, ref) == pytest.approx(sklearn.metrics.mean_squared_error(ref, pred), **TOL)
    assert gm.rmse(pred, ref) == pytest.approx(
        math.sqrt(sklearn.metrics.mean_squared_error(ref, pred)), **TOL
    )
    assert gm.mae(pred, ref) == pytest.approx(sklearn.metrics.mean_absolute_error(ref, pred), **TOL)
    assert gm.pearson(pred, ref) == pytest.approx(scipy.stats.pearsonr(pred, ref).statistic, **TOL)
    assert gm.spearman(pred, ref) == pytest.approx(scipy.stats.spearmanr(pred, ref).statistic, **TOL)
    assert np.array_equal(gm.rank(pred), scipy.stats.rankdata(pred))
    assert np.array_equal(gm.rank(ref), scipy.stats.rankdata(ref))


def test_correlation_of_constant_is_nan():
    assert math.isnan(gm.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(gm.spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(GraftError, match="at least 2"):
        gm.pearson([1.0], [2.0])


# ---------------------------------------------------------------- NER

NER = {
    "iob2": (
        [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O", "B-PER"]],
        [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O", "O", "B-PER"]],
    ),
    "entity at sequence end": (
        [["O", "B-MISC", "I-MISC"], ["B-PER"], ["O", "O", "B-LOC", "I-LOC"]],
        [["O", "B-MISC", "I-MISC"], ["B-PER"], ["O", "O", "B-LOC", "O"]],
    ),
    "I- without B- (IOB1)": (
        [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["O", "I-ORG"]],
        [["B-PER", "I-PER", "O", "I-LOC", "I-LOC"], ["O", "I-ORG"]],
    ),
    "type change inside": (
        [["B-PER", "I-LOC", "I-LOC", "O"], ["B-ORG", "I-ORG", "I-PER"]],
        [["B-PER", "B-LOC", "I-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG"]],
    ),
    "iobes": (
        [["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"], ["B-ORG", "E-ORG", "S-MISC"]],
        [["S-PER", "O", "B-LOC", "E-LOC", "O"], ["B-ORG", "E-ORG", "S-MISC"]],
    ),
    "type missing from predictions": (
        [["O", "O", "B-PER"], ["O"]],
        [["B-LOC", "O", "B-PER"], ["B-ORG"]],
    ),
    "untyped and hyphenated types": (
        [["B", "I", "O", "B-GEO-NAME", "I-GEO-NAME"]],
        [["B", "O", "O", "B-GEO-NAME", "I-GEO-NAME"]],
    ),
}


@pytest.mark.parametrize("zero_division", [0, 1])
@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
@pytest.mark.parametrize("case", NER)
def test_entity_scores(case, average, zero_division):
    pred, ref = NER[case]
    ours = gm.entity_precision_recall_f1(pred, ref, average=average, zero_division=zero_division)
    theirs = seqeval_prfs(ref, pred, average=average, zero_division=zero_division)[:3]
    if average is None:
        ours = [list(o.values()) for o in ours]
        assert np.allclose(ours, theirs, rtol=1e-9, atol=0)
    else:
        assert ours == pytest.approx(theirs, **TOL)
    if average == "micro":
        assert gm.entity_f1(pred, ref, zero_division=zero_division) == pytest.approx(
            seqeval.metrics.f1_score(ref, pred, zero_division=zero_division), **TOL
        )


@pytest.mark.parametrize("case", NER)
def test_entity_report_and_token_accuracy(case):
    pred, ref = NER[case]
    ours = gm.entity_report(pred, ref)
    theirs = seqeval.metrics.classification_report(ref, pred, output_dict=True, zero_division=0)
    assert list(ours) == list(theirs)
    for key, row in theirs.items():
        expected = [row["precision"], row["recall"], row["f1-score"], row["support"]]
        assert [ours[key][m] for m in ("precision", "recall", "f1", "support")] == pytest.approx(
            expected, **TOL
        )
    assert gm.token_accuracy(pred, ref) == pytest.approx(seqeval.metrics.accuracy_score(ref, pred), **TOL)


@pytest.mark.parametrize("case", NER)
def test_get_entities(case):
    for seq in [*NER[case][0], *NER[case][1]]:
        assert gm.get_entities(seq) == seqeval_get_entities(seq)


def test_no_entities_anywhere():
    pred, ref = [["O", "O"], ["O"]], [["O", "O"], ["O"]]
    for average in ("micro", "weighted"):
        theirs = seqeval_prfs(ref, pred, average=average, zero_division=0)
        assert gm.entity_precision_recall_f1(pred, ref, average=average) == pytest.approx(theirs[:3])


def test_ner_bad_input():
    with pytest.raises(GraftError, match=r"predictions\[0\] has 2 tags but references\[0\] has 1"):
        gm.entity_f1([["O", "O"]], [["O"]])
    with pytest.raises(GraftError, match=r"references\[0\]\[1\] is 'PER'"):
        gm.entity_f1([["O", "B-PER"]], [["O", "PER"]])


# ---------------------------------------------------------------- SQuAD


# The official SQuAD v1.1 evaluation script (evaluate-v1.1.py), its scoring functions verbatim.
def v1_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def v1_f1_score(prediction, ground_truth):
    prediction_tokens = v1_normalize_answer(prediction).split()
    ground_truth_tokens = v1_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def v1_exact_match_score(prediction, ground_truth):
    return v1_normalize_answer(prediction) == v1_normalize_answer(ground_truth)


def v1_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


# The official SQuAD v2.0 script (evaluate-v2.0.py): no-answer handling.
def v2_compute_f1(a_gold, a_pred):
    gold_toks = v1_normalize_answer(a_gold).split() if a_gold else []
    pred_toks = v1_normalize_answer(a_pred).split() if a_pred else []
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def v2_scores(prediction, answers):
    gold = [a for a in answers if v1_normalize_answer(a)] or [""]
    exact = max(int(v1_normalize_answer(a) == v1_normalize_answer(prediction)) for a in gold)
    return exact, max(v2_compute_f1(a, prediction) for a in gold)


SQUAD_ANSWERABLE = [
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos", "Broncos"]),
    ("the Broncos!", ["Denver Broncos"]),
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara, California"]),
    ("an apple a day", ["apple day", "A day"]),
    ("", ["1,000 people"]),
    ("  Gold   medal ", ["gold"]),
    ("Ünïcode café", ["unicode café", "Café"]),
    ("1.5 million", ["one point five million"]),
]
SQUAD_UNANSWERABLE = [("", []), ("", [""]), ("something", []), ("The", ["  "]), ("a", ["the"])]


def test_normalize_answer():
    for prediction, answers in SQUAD_ANSWERABLE:
        for text in [prediction, *answers]:
            assert gm.normalize_answer(text) == v1_normalize_answer(text)


def test_squad_v1():
    predictions = [p for p, _ in SQUAD_ANSWERABLE]
    references = [a for _, a in SQUAD_ANSWERABLE]
    em = [v1_metric_max_over_ground_truths(v1_exact_match_score, p, a) for p, a in SQUAD_ANSWERABLE]
    f1 = [v1_metric_max_over_ground_truths(v1_f1_score, p, a) for p, a in SQUAD_ANSWERABLE]
    for (p, a), e, f in zip(SQUAD_ANSWERABLE, em, f1, strict=True):
        assert gm.squad_exact_match(p, a) == e
        assert gm.squad_f1(p, a) == pytest.approx(f, **TOL)
    result = gm.squad(predictions, references)
    assert result["exact_match"] == pytest.approx(100.0 * sum(em) / len(em), **TOL)
    assert result["f1"] == pytest.approx(100.0 * sum(f1) / len(f1), **TOL)


@pytest.mark.parametrize("prediction, answers", SQUAD_UNANSWERABLE + SQUAD_ANSWERABLE)
def test_squad_v2_no_answer(prediction, answers):
    exact, f1 = v2_scores(prediction, answers)
    assert gm.squad_exact_match(prediction, answers) == exact
    assert gm.squad_f1(prediction, answers) == pytest.approx(f1, **TOL)


# ---------------------------------------------------------------- ROUGE, BLEU, chrF

# (predictions, references): references[i] is one string or a list of them
TEXT = {
    "single reference": (
        [
            "The quick brown fox jumps over the lazy dog.",
            "It is raining cats and dogs in the city tonight!",
            "Transformers are trained on large corpora of text.",
        ],
        [
            "The quick brown dog jumps on the log.",
            "Tonight it rains heavily in the city.",
            "A transformer is pretrained on a large text corpus, then fine-tuned.",
        ],
    ),
    "multi reference": (
        [
            "the cat sat on the mat",
            "he read the book because he was interested in world history",
            "There are 1,000 people in the state-of-the-art lab, aren't there?",
        ],
        [
            ["the cat is on the mat", "there is a cat on the mat", "a cat sat upon the mat"],
            ["he was interested in world history because he read the book", "he read a history book"],
            ["1,000 people work in the lab.", "The state-of-the-art lab has 1.000 people; isn't it?"],
        ],
    ),
    "empty strings": (
        ["", "nothing matches here", "a b c d", "x"],
        ["the reference", "", "a b c d", ["", "x y"]],
    ),
    "html entities and numbers": (
        ["R&amp;D spent $3.5M in 2023 -- up 20%", "Q&A: 3.14 &lt; 4 &gt; 2 (pi) 12-15"],
        ["R&D spent 3.5 million dollars in 2023, up 20 %", "Q and A: 3.14 < 4 > 2 (pi) 12 - 15"],
    ),
    "stemming matters": (
        ["The runners were running happily through the generously sized parks", "relational conditional"],
        ["A runner runs happy through generous parks", "relate condition conditionally"],
    ),
    "perfect": (["same words here", "and here too"], ["same words here", "and here too"]),
}


def reference_streams(references):
    """Per-example reference lists to sacrebleu's streams (stream k holds every example's k-th reference)."""
    lists = [[r] if isinstance(r, str) else r for r in references]
    width = max(map(len, lists))
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]


@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("case", TEXT)
def test_rouge(case, use_stemmer):
    predictions, references = TEXT[case]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    scores = [
        scorer.score_multi([r] if isinstance(r, str) else r, p)
        for p, r in zip(predictions, references, strict=True)
    ]
    ours = gm.rouge(predictions, references, use_stemmer=use_stemmer)
    assert list(ours) == ["rouge1", "rouge2", "rougeL"]
    for key, value in ours.items():
        assert value == pytest.approx(np.mean([s[key].fmeasure for s in scores]), **TOL)


def test_rouge_tokenizer_and_porter_stemmer():
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for predictions, references in TEXT.values():
        for text in [
            *predictions,
            *[r for refs in references for r in ([refs] if isinstance(refs, str) else refs)],
        ]:
            assert gm.rouge_tokenize(text, use_stemmer=True) == scorer._tokenizer.tokenize(text)


# words that exercise every rule of the stemmer, and NLTK's special cases
STEM_WORDS = (
    "caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled sized "
    "hopping tanned falling hissing fizzed failing filing happy sky relational conditional rational "
    "valenci hesitanci digitizer conformabli radicalli differentli vileli analogousli vietnamization "
    "predication operator feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti "
    "triplicate formative formalize electriciti electrical hopeful goodness revival allowance inference "
    "airliner gyroscopic adjustable defensible irritant replacement adjustment dependent adoption "
    "homologou communism activate angulariti homologous effective bowdlerize probate rate cease "
    "controll roll generalizations oscillators dying lying tying skies news innings outings cannings "
    "howe proceed exceed succeed dies spied cried tried flies enjoy enjoyment spy fly try analogies "
    "archaeology biologically fully carefully hopefulli syzygy toy yyyy queued eeds seeing agreed "
    "bleed ied pies cries boys days quietly quickly universal university generously sized running "
    "runner runners happily parks ab is as abl aie ees ying yes y2k 1990s covid19"
).split()


def test_porter_stem_matches_nltk():
    stemmer = PorterStemmer()  # rouge_score's default, NLTK_EXTENSIONS mode
    assert [gm.porter_stem(w) for w in STEM_WORDS] == [stemmer.stem(w) for w in STEM_WORDS]


@pytest.mark.parametrize("case", TEXT)
def test_tokenize_13a(case):
    predictions, references = TEXT[case]
    tokenizer = Tokenizer13a()
    for text in [
        *predictions,
        *[r for refs in references for r in ([refs] if isinstance(refs, str) else refs)],
    ]:
        assert gm.tokenize_13a(text) == tokenizer(text).split()


@pytest.mark.parametrize("case", TEXT)
def test_bleu(case):
    predictions, references = TEXT[case]
    expected = sacrebleu.corpus_bleu(predictions, reference_streams(references)).score
    assert gm.bleu(predictions, references) == pytest.approx(expected, **TOL)


@pytest.mark.parametrize(
    "options",
    [
        {"smooth": "none"},
        {"smooth": "floor"},
        {"smooth": "add-k"},
        {"lowercase": True},
        {"tokenize": "none"},
        {"max_order": 2},
    ],
)
@pytest.mark.parametrize("case", ["single reference", "multi reference", "html entities and numbers"])
def test_bleu_options(case, options):
    predictions, references = TEXT[case]
    theirs = {"smooth": "smooth_method", "max_order": "max_ngram_order"}
    kwargs = {theirs.get(k, k): v for k, v in options.items()}
    expected = BLEU(**kwargs).corpus_score(predictions, reference_streams(references)).score
    assert gm.bleu(predictions, references, **options) == pytest.approx(expected, **TOL)


@pytest.mark.parametrize(
    "options", [{}, {"word_order": 2}, {"lowercase": True}, {"beta": 1, "char_order": 4}]
)
@pytest.mark.parametrize("case", TEXT)
def test_chrf(case, options):
    predictions, references = TEXT[case]
    expected = CHRF(**options).corpus_score(predictions, reference_streams(references)).score
    assert gm.chrf(predictions, references, **options) == pytest.approx(expected, **TOL)


# ---------------------------------------------------------------- perplexity


def test_perplexity():
    assert gm.perplexity(2.0) == pytest.approx(math.exp(2.0), **TOL)
    assert gm.perplexity([1.0, 2.0, 4.5]) == pytest.approx(math.exp(2.5), **TOL)
    # a model that is uniform over V tokens has perplexity V
    vocab = 50
    log_probs = scipy.special.log_softmax(np.zeros((7, vocab)), axis=-1)
    assert gm.perplexity(-log_probs[:, 3]) == pytest.approx(vocab, **TOL)
    assert gm.perplexity(1000.0) == math.inf
    with pytest.raises(GraftError, match="nan or infinite"):
        gm.perplexity([1.0, float("nan")])
    with pytest.raises(GraftError, match="at least one"):
        gm.perplexity([])


# ---------------------------------------------------------------- registry, task sets, errors


@pytest.mark.parametrize(
    "kind, predictions, references, keys",
    [
        (
            "classification",
            *CLASSIFICATION["multiclass"],
            {"accuracy", "f1_macro", "f1_micro", "f1_weighted"},
        ),
        ("multilabel", MULTILABEL_PRED, MULTILABEL_REF, {"accuracy", "f1_micro", "f1_macro"}),
        ("regression", *REGRESSION["plain"], {"mse", "rmse", "mae", "pearson", "spearman"}),
        ("ner", *NER["iob2"], {"precision", "recall", "f1", "accuracy"}),
        ("qa", ["Denver Broncos", ""], [["Broncos"], []], {"exact_match", "f1"}),
        ("lm", [1.0, 2.0, 3.0], None, {"loss", "perplexity"}),
        ("seq2seq", *TEXT["multi reference"], {"bleu", "chrf", "rouge1", "rouge2", "rougeL"}),
    ],
)
def test_compute_metrics(kind, predictions, references, keys):
    result = gm.compute_metrics(kind, predictions, references)
    assert keys <= set(result)
    assert all(isinstance(v, float) for v in result.values())


def test_task_sets_agree_with_the_metrics():
    pred, ref = CLASSIFICATION["zero-division"]
    result = gm.compute_metrics("classification", pred, ref)
    assert result["f1_macro"] == pytest.approx(sklearn.metrics.f1_score(ref, pred, average="macro"), **TOL)
    assert result["f1_weighted"] == pytest.approx(
        sklearn.metrics.f1_score(ref, pred, average="weighted"), **TOL
    )
    predictions, references = TEXT["multi reference"]
    result = gm.compute_metrics("seq2seq", predictions, references)
    assert result["bleu"] == gm.bleu(predictions, references)
    assert result["rougeL"] == gm.rouge(predictions, references, use_stemmer=True)["rougeL"]
    ner = gm.compute_metrics("ner", *NER["iob2"])
    assert ner["f1"] == pytest.approx(seqeval.metrics.f1_score(NER["iob2"][1], NER["iob2"][0]), **TOL)
    assert gm.compute_metrics("lm", [1.0, 3.0]) == {"loss": 2.0, "perplexity": math.exp(2.0)}


def test_registry():
    for name, fn in gm.METRICS.items():
        assert gm.get_metric(name) is fn
    with pytest.raises(GraftError, match="did you mean 'accuracy'"):
        gm.get_metric("acuracy")
    with pytest.raises(GraftError, match="did you mean 'seq2seq'"):
        gm.compute_metrics("seq2sq", ["a"], ["a"])


@pytest.mark.parametrize(
    "fn", [gm.accuracy, gm.f1, gm.mse, gm.pearson, gm.squad, gm.rouge, gm.bleu, gm.chrf, gm.confusion_matrix]
)
def test_length_mismatch(fn):
    predictions = (
        ["a", "b", "c", "d", "e"] if fn in (gm.squad, gm.rouge, gm.bleu, gm.chrf) else [1, 2, 3, 4, 5]
    )
    with pytest.raises(GraftError, match="^predictions has 5 items but references has 4$"):
        fn(predictions, predictions[:4])


def test_bad_arguments():
    with pytest.raises(GraftError, match="average must be one of"):
        gm.f1([1], [1], average="samples")
    with pytest.raises(GraftError, match="empty"):
        gm.accuracy([], [])
    with pytest.raises(GraftError, match="smooth"):
        gm.bleu(["a"], ["a"], smooth="add-one")
    with pytest.raises(GraftError, match=r"references\[0\] must be a string or a non-empty list"):
        gm.bleu(["a"], [[]])
