"""Generation metrics: ROUGE-1/2/L as rouge_score (0-1), corpus BLEU and chrF as sacrebleu (0-100).

references[i] is the reference of predictions[i], or a list of references for it.
"""

import math
import re
from collections import Counter
from collections.abc import Sequence

from graft.errors import GraftError
from graft.metrics._common import check_pair
from graft.metrics.porter import porter_stem


def _reference_lists(predictions: Sequence[str], references: Sequence) -> list[list[str]]:
    check_pair(predictions, references)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, (prediction, options) in enumerate(zip(predictions, refs, strict=True)):
        if not isinstance(prediction, str):
            raise GraftError(f"predictions[{i}] is {type(prediction).__name__}; expected a string")
        if not options or not all(isinstance(r, str) for r in options):
            raise GraftError(f"references[{i}] must be a string or a non-empty list of strings")
    return refs


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------- ROUGE


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge_score's default tokenizer: lowercase, split on anything not a-z or 0-9, optionally stem."""
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [porter_stem(t) if use_stemmer and len(t) > 3 else t for t in tokens]


def _fmeasure(overlap: int, n_pred: int, n_ref: int) -> float:
    precision, recall = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)  # one row of the dynamic-programming table
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_pair(pred: list[str], ref: list[str]) -> dict[str, float]:
    scores = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        scores[f"rouge{n}"] = _fmeasure(sum((p & r).values()), sum(p.values()), sum(r.values()))
    scores["rougeL"] = _fmeasure(_lcs_length(ref, pred), len(pred), len(ref)) if pred and ref else 0.0
    return scores


def rouge(predictions: Sequence[str], references: Sequence, *, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures; with several references, the best one per type."""
    refs = _reference_lists(predictions, references)
    totals = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    for prediction, options in zip(predictions, refs, strict=True):
        pred = rouge_tokenize(prediction, use_stemmer)
        pairs = [_rouge_pair(pred, rouge_tokenize(r, use_stemmer)) for r in options]
        for key in totals:
            totals[key] += max(scores[key] for scores in pairs)
    return {key: value / len(predictions) for key, value in totals.items()}


# ---------------------------------------------------------------- BLEU

# mteval-v13a's tokenizer, as sacrebleu's '13a'
_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash when preceded by a digit
]


def tokenize_13a(text: str) -> list[str]:
    """Split text into tokens the way sacrebleu's default '13a' tokenizer does."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _13A:
        text = pattern.sub(replacement, text)
    return text.split()


def _closest_length(length: int, options: list[int]) -> int:
    """The reference length closest to `length`, the shorter one on a tie."""
    return min(options, key=lambda n: (abs(n - length), n))


def bleu(
    predictions: Sequence[str],
    references: Sequence,
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    smooth: str = "exp",
    max_order: int = 4,
) -> float:
    """Corpus BLEU (0-100) as sacrebleu.corpus_bleu.

    tokenize is '13a' or 'none' (split on whitespace); smooth is 'exp' (sacrebleu's default),
    'floor' (0.1), 'add-k' (k=1) or 'none'.
    """
    if tokenize not in ("13a", "none"):
        raise GraftError(f"tokenize must be '13a' or 'none', got {tokenize!r}")
    if smooth not in ("exp", "floor", "add-k", "none"):
        raise GraftError(f"smooth must be 'exp', 'floor', 'add-k' or 'none', got {smooth!r}")
    refs = _reference_lists(predictions, references)

    def tokens(text: str) -> list[str]:
        text = text.lower() if lowercase else text
        return tokenize_13a(text.rstrip()) if tokenize == "13a" else text.split()

    correct, total = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for prediction, options in zip(predictions, refs, strict=True):
        pred = tokens(prediction)
        ref_tokens = [tokens(r) for r in options]
        pred_len += len(pred)
        ref_len += _closest_length(len(pred), [len(r) for r in ref_tokens])
        for n in range(1, max_order + 1):
            clip = Counter()  # each n-gram counts at most as often as in the reference that has it most
            for r in ref_tokens:
                clip |= _ngrams(r, n)
            found = _ngrams(pred, n)
            total[n - 1] += sum(found.values())
            correct[n - 1] += sum((found & clip).values())
    return _bleu_score(correct, total, pred_len, ref_len, smooth)


def _bleu_score(correct: list[int], total: list[int], pred_len: int, ref_len: int, smooth: str) -> float:
    """sacrebleu's BLEU.compute_bleu with its smoothing methods."""
    if not any(correct):
        return 0.0
    brevity = 1.0 if pred_len >= ref_len else (math.exp(1 - ref_len / pred_len) if pred_len else 0.0)
    precisions = [0.0] * len(correct)
    exp_factor = 1.0
    for n, (c, t) in enumerate(zip(correct, total, strict=True)):
        if smooth == "add-k" and n > 0:
            c, t = c + 1, t + 1
        if t == 0:
            break  # no longer n-grams: the remaining precisions stay 0
        if c > 0:
            precisions[n] = 100.0 * c / t
        elif smooth == "exp":  # NIST smoothing: 1/2, 1/4, ... of a match for each order without one
            exp_factor *= 2
            precisions[n] = 100.0 / (exp_factor * t)
        elif smooth == "floor":
            precisions[n] = 100.0 * 0.1 / t
    # sacrebleu floors log(0) at -9999999999, which makes the score 0
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions]
    return brevity * math.exp(sum(logs) / len(logs))


# ---------------------------------------------------------------- chrF

_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _chrf_words(text: str) -> list[str]:
    """Words with one leading or trailing punctuation mark split off, as chrF++ does."""
    words = []
    for w in text.split():
        if len(w) > 1 and w[-1] in _PUNCT:
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _PUNCT:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def _chrf_ngrams(text: str, char_order: int, word_order: int, whitespace: bool) -> list[Counter]:
    chars = text if whitespace else "".join(text.split())
    grams = [Counter(chars[i : i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    words = _chrf_words(text) if word_order else []
    return grams + [_ngrams(words, n) for n in range(1, word_order + 1)]


def _chrf_stats(pred: list[Counter], ref: list[Counter]) -> list[tuple[int, int, int]]:
    """(predicted, reference, matching) n-gram counts per order."""
    return [
        (sum(p.values()) if r else 0, sum(r.values()), sum((p & r).values()))
        for p, r in zip(pred, ref, strict=True)
    ]


def _chrf_score(stats: list[tuple[int, int, int]], beta: float) -> float:
    """F-beta of the precision and recall averaged over the orders that have n-grams on both sides."""
    precisions = [m / p for p, r, m in stats if p > 0 and r > 0]
    recalls = [m / r for p, r, m in stats if p > 0 and r > 0]
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    b2 = beta**2
    return 100 * (1 + b2) * precision * recall / (b2 * precision + recall)


def chrf(
    predictions: Sequence[str],
    references: Sequence,
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
) -> float:
    """Corpus chrF (0-100) as sacrebleu.corpus_chrf; word_order=2 gives chrF++.

    With several references, each sentence uses the one with its best sentence-level chrF.
    """
    refs = _reference_lists(predictions, references)
    corpus = [(0, 0, 0)] * (char_order + word_order)
    for prediction, options in zip(predictions, refs, strict=True):
        if lowercase:
            prediction, options = prediction.lower(), [r.lower() for r in options]
        pred = _chrf_ngrams(prediction, char_order, word_order, whitespace)
        candidates = [_chrf_stats(pred, _chrf_ngrams(r, char_order, word_order, whitespace)) for r in options]
        best = max(candidates, key=lambda s: _chrf_score(s, beta))  # first best, as sacrebleu
        corpus = [tuple(a + b for a, b in zip(x, y, strict=True)) for x, y in zip(corpus, best, strict=True)]
    return _chrf_score(corpus, beta)
