"""graft/serve/packing.py: texts packed several to a row give what each gets padded, in every
encoder family; the rows hold every text once, within the width."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from conftest import hf_model, padded_batch, tiny_hf_config

from graft.data.packing import packable
from graft.kernels import optimize
from graft.loading import load_model
from graft.models import FAMILIES
from graft.nn import Transformer, TransformerConfig
from graft.serve.packing import (
    bins,
    bucket,
    embed_packed,
    output_packed,
    predict_packed,
    right_padded,
    row_width,
    segments_of,
)
from graft.tasks.collate import pad
from graft.tasks.pooling import mean_pool

TOKEN_FAMILIES = sorted(
    n for n, f in FAMILIES.items() if f.inputs == "tokens" and not f.encoder_decoder and not f.dual_encoder
)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("kernels", [True, False])
def test_packed_embeddings_equal_padded_ones(tmp_path, family, kernels):
    hf_model(family).save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base", kernels=kernels)
    assert packable(body) == (not FAMILIES[family].decoder)  # a causal mask would see the row's earlier texts
    if not packable(body):
        return
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 1, 9, 30, 2, 2, 11, 30]  # rows of 30: [30], [30], [17, 11, 2], [9, 3, 2, 1, ...]
    ids = [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]  # segment ids reach the model too
    padded_ids, mask = pad(ids, 0)
    padded_types, _ = pad(types, 0)
    with torch.inference_mode():
        hidden = body(padded_ids, mask, token_type_ids=padded_types).last_hidden_state  # (B, T, H)
        expected = mean_pool(hidden, mask)
    torch.testing.assert_close(embed_packed(body, ids, types), expected, atol=1e-5, rtol=0)
    one = embed_packed(body, ids[1:2], types[1:2])  # a lone text: one row of its own
    torch.testing.assert_close(one, expected[1:2], atol=1e-5, rtol=0)
    wide = [16] + [9] * 6  # rows wider than the longest text (row_width): [16], then [9, 9] in rows of 18
    ids = [torch.randint(3, 99, (n,), generator=g).tolist() for n in wide]
    padded_ids, mask = pad(ids, 0)
    with torch.inference_mode():
        expected = mean_pool(body(padded_ids, mask).last_hidden_state, mask)
    got = embed_packed(body, ids, [[0] * n for n in wide])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(10))
def test_bins_hold_every_text_once_within_the_width(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 50))]
    rows = bins(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    # first fit: a row at most half full would have taken the items of any later such row
    assert sum(2 * sum(lengths[i] for i in row) <= max(lengths) for row in rows) <= 1


def test_rows_are_widened_only_where_fewer_rows_fill_better_and_never_beyond_the_limit():
    lengths = [16] + [9] * 6  # width 16: each 9 alone, 7 rows of 16 (112 slots); 18: pairs, 4 rows (72)
    assert row_width(lengths, 512) == 18
    assert row_width(lengths, 16) == 16  # the limit holds
    assert row_width([600, 3], 256) == 600  # a text over the limit keeps its own width
    assert row_width([10, 10, 10, 11], 512) == 11  # wider rows would hold no fewer slots


@pytest.mark.parametrize("seed", range(20))
def test_the_row_width_is_the_cheapest_of_the_widths_tried(seed):
    """row_width skips widths that cannot win; the choice is the exhaustive one's: the least cost
    (rows x width x its attention), the narrower width on a tie."""
    from graft.serve.packing import ATTENTION

    rng = random.Random(seed)
    lengths = [rng.randint(2, 60) for _ in range(rng.randint(1, 64))]
    longest, limit = max(lengths), rng.choice([32, 64, 256])
    widths = {min(max(longest, limit), longest + longest * j // 8) for j in range(9)}
    best = min(widths, key=lambda w: (len(bins(lengths, w)) * w * (1 + w * ATTENTION), w))
    assert row_width(lengths, limit) == best


def test_token_counts_round_up_to_a_few_dozen_buckets_an_octave():
    assert [bucket(t) for t in (1, 8, 9, 300, 511, 512, 513, 1000, 5000)] == [
        8,
        8,
        16,
        304,
        512,
        512,
        528,
        1008,
        5120,
    ]
    for t in range(1, 5000):
        assert t <= bucket(t) == bucket(bucket(t))  # a bucket is its own
        assert bucket(t) - t < max(8, t / 32)  # at most a 32nd of the tokens over 256
    assert len({bucket(t) for t in range(150, 700)}) == 58  # the token counts of BBC texts 16 at a time


@pytest.mark.parametrize("lengths", [[5, 2, 7], [3] * 300, [40, 1, 1]])
def test_a_packed_forward_runs_on_a_bucket_of_tokens_padded_by_texts_no_longer_than_the_longest(lengths):
    """The padding goes after the texts and is cut off; no padding text is longer than the longest
    text (300 texts of 3 tokens, 900 -> 912: four of 3), so it never widens the rows."""
    from graft.serve.packing import forward_packed

    body = stacks()["rotary"]
    seen = []
    hook = body.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[1], int(kwargs["position_ids"].max()))),
        with_kwargs=True,
    )
    ids = [[(7 * i + j) % 98 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    with torch.inference_mode():
        hidden, text, within = forward_packed(body, ids, [[0] * n for n in lengths])
    hook.remove()
    T = sum(lengths)
    assert seen == [(bucket(T), max(lengths) - 1)]
    assert hidden.shape[1] == len(text) == len(within) == T
    assert sorted(zip(text.tolist(), within.tolist(), strict=True)) == [
        (i, j) for i, n in enumerate(lengths) for j in range(n)
    ]


def stacks() -> dict[str, Transformer]:
    """Tiny encoders for the attention paths a family's test does not reach: rotary positions, and
    a prefix-tuned body (the prefix's keys open every row of texts)."""
    from graft.strategies.prompt import add_prefixes

    torch.manual_seed(0)
    config = dict(
        family="tiny", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )
    rotary = Transformer(TransformerConfig(**config, position="rotary")).eval()
    prefixed = Transformer(TransformerConfig(**config)).eval()
    add_prefixes(prefixed, 3, 0)  # (random keys and values)
    return {"rotary": rotary, "prefixed": prefixed}


@pytest.mark.parametrize("name", ["rotary", "prefixed"])
@pytest.mark.parametrize("kernels", [True, False])
def test_texts_end_to_end_attend_each_to_itself_on_every_path(name, kernels):
    """Segments: the texts' tokens end to end, attending as rows, give each text's hidden states
    alone, with the reference's attention, the kernels' and the written-out math that has the
    probabilities (each row's, its texts' blocks only)."""
    body = stacks()[name]
    if kernels:
        body = optimize(body)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7, 3, 1]
    ids = [torch.randint(1, 99, (n,), generator=g) for n in lengths]
    with torch.inference_mode():
        alone = [body(t[None]).last_hidden_state[0] for t in ids]  # (n, H) each
        packed = embed_packed(body, [t.tolist() for t in ids], [[0] * n for n in lengths])
        # the probabilities: each text's queries see only its own keys (and a prefix's)
        rows = bins(lengths, 7)  # [[2], [0, 1], [3, 4]] in rows of 7
        segments, order, _, within = segments_of(lengths, rows, 7)
        tokens = torch.cat([ids[i] for i in order])[None]
        out = body(tokens, segments, position_ids=within[None], output_attentions=True)
    expected = torch.stack([h.mean(0) for h in alone])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.last_hidden_state[0], torch.cat([alone[i] for i in order]), atol=1e-5, rtol=0
    )
    probs = out.attentions[0]  # (R, nh, W, P + W)
    prefix = probs.shape[-1] - 7
    assert probs.shape == (3, 4, 7, prefix + 7) and prefix == (3 if name == "prefixed" else 0)
    first, second = lengths[0], lengths[1]  # row 1 holds text 0 then text 1
    assert probs[1, :, :first, prefix + first :].abs().max() == 0  # text 0 sees nothing of text 1
    assert probs[1, :, first : first + second, prefix : prefix + first].abs().max() == 0


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("kernels", [True, False])
def test_a_right_padded_batch_packed_gives_the_padded_forward_at_its_real_tokens(tmp_path, family, kernels):
    """output_packed: the body's hidden states at the real tokens and the pooler's output, as the
    padded forward gives them; zeros at the padding."""
    hf_model(family).save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base", kernels=kernels)
    if not packable(body):
        return
    ids, mask = padded_batch()  # rows of 9, 6 and 2 real tokens
    types = (torch.arange(9) >= 4).long().expand(3, -1) * mask
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    assert right_padded(batch)
    with torch.inference_mode():
        expected = body(**batch)
    got = output_packed(body, batch)
    real = mask.bool()
    torch.testing.assert_close(
        got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=0
    )
    assert got.last_hidden_state[~real].abs().max() == 0
    if expected.pooled is not None:
        torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=0)


def test_only_right_padded_token_batches_pack():
    ids, mask = padded_batch()
    assert right_padded({"input_ids": ids, "attention_mask": mask})
    left, left_mask = padded_batch("left")
    assert not right_padded({"input_ids": left, "attention_mask": left_mask})  # padding first
    assert not right_padded({"input_ids": ids})  # no mask: nothing says which tokens are real
    assert not right_padded(
        {"input_ids": ids, "attention_mask": mask, "position_ids": mask}
    )  # positions of its own
    empty = mask.clone()
    empty[2] = 0
    assert not right_padded({"input_ids": ids, "attention_mask": empty})  # a row without a token


def close(a: Any, b: Any) -> bool:
    """Predictions alike: the same keys, labels and spans, numbers within 1e-5."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float):
        return isinstance(b, float) and abs(a - b) <= 1e-5
    return a == b


CONTEXT = (
    "Graft is a toolkit for transfer learning. It loads pretrained transformers from folders. The author "
    "of the book lives in Reykjavik, near the harbour. It trains them on small budgets with adapters."
)
RECORDS = {  # each task's records, of mixed lengths
    "classification": [
        {"text": "A short one.", "text_pair": "Yes."},  # pairs: segment ids reach the body too
        {
            "text": "The central bank raised its rates again on Thursday, the third time.",
            "text_pair": "Rates.",
        },
        {"text": "Shares fell.", "text_pair": "Markets were calm in the morning and turned later."},
    ],
    "token-classification": [
        {"tokens": ["Shahin", "Siadati", "joined", "HuggingFace", "Inc.", "in", "Reykjavik", "."]},
        {"tokens": ["Hello", "."]},
    ],
    "question-answering": [
        {"id": "a", "question": "Where does the author live?", "context": CONTEXT},
        {"id": "b", "question": "What is graft?", "context": "Graft is a toolkit."},
    ],
}
HEAD_OPTIONS = {  # each task's heads: (task, head options)
    "single label": ("classification", {"id2label": ["negative", "neutral", "positive"]}),
    "multi-label, mean pooling": (
        "classification",
        {"id2label": ["a", "b", "c"], "problem_type": "multi_label", "pooling": "mean"},
    ),
    "regression, first token": (
        "classification",
        {"num_labels": 1, "problem_type": "regression", "pooling": "cls"},
    ),
    "tags": ("token-classification", {"id2label": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]}),
    "answers in windows": ("question-answering", {"stride": 8}),
}


@pytest.mark.parametrize("head", sorted(HEAD_OPTIONS))
def test_packed_predictions_are_graft_predicts(minilm, head):
    """predict_packed (graft serve's /predict on a packable encoder) gives what graft predict gives,
    for each task's head: classification's poolings and problems, tags mapped to words, answers
    found across windows."""
    from graft.tasks import HEADS, TaskModel
    from graft.tasks.predict import predict
    from graft.tokenizer import Tokenizer

    task, options = HEAD_OPTIONS[head]
    tokenizer = Tokenizer.from_folder(minilm)
    config = FAMILIES["bert"].config_from_hf(
        tiny_hf_config("bert").to_dict() | {"vocab_size": tokenizer.vocab_size}
    )
    torch.manual_seed(0)
    body = Transformer(config).eval()
    model = TaskModel(body, HEADS[task](body, **options)).eval()
    for p in model.head.parameters():  # a head that tells its inputs apart
        torch.nn.init.normal_(p, std=0.5)
    records = RECORDS[task]
    expected = [prediction for _, prediction in predict(model, tokenizer, records, len(records))]
    alone = [prediction for record in records for _, prediction in predict(model, tokenizer, [record], 1)]
    assert close(expected, alone)  # (what a record gets does not depend on what it is batched with)
    got = predict_packed(model, tokenizer, records)
    assert got is not None and close(got, expected), (got, expected)
