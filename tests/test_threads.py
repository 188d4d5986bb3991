"""One loaded model and tokenizer serve many threads: outputs equal the serial ones exactly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from graft.loading import load_model
from graft.tasks.embedding import embed
from graft.tasks.predict import predict
from graft.tokenizer import Tokenizer

THREADS = 8
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, everyone should see it at least twice this summer.",
    "Stocks fell sharply on Monday.",
    "short",
    "Parliament debated the bill late into the night while protesters gathered outside.",
    "The striker scored twice in the second half.",
]


def in_threads(job, n: int = THREADS) -> list:
    """Run job(i) for i in range(n) on n threads at once; results in order."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(job, range(n)))


def test_encoding_in_threads_never_sees_another_calls_settings(minilm):
    tokenizer = Tokenizer.from_folder(minilm)
    settings = [
        {"padding_side": side, "max_length": length}
        for side in ("left", "right")
        for length in (4, 7, 12, None)
    ]

    def encode(i: int):
        kwargs = settings[i % len(settings)]
        return [tokenizer.encode(TEXTS, **kwargs).input_ids for _ in range(20)]

    serial = [encode(i) for i in range(len(settings))]
    for i, got in enumerate(in_threads(encode, n=len(settings))):
        for ids in got:
            assert torch.equal(ids, serial[i][0]), settings[i]
    assert tokenizer.padding_side == "right"  # nothing a call asked for stays behind


def test_predict_and_embed_in_threads_equal_serial(minilm):
    torch.manual_seed(0)
    model = load_model(minilm, task="classification", num_labels=3).eval()
    body = model.body
    tokenizer = Tokenizer.from_folder(minilm)
    records = [{"text": t} for t in TEXTS]

    def job(i: int):
        # even threads classify, odd threads embed, each a different slice so batches differ
        texts = TEXTS[i % 3 :]
        if i % 2 == 0:
            got = predict(model, tokenizer, records[i % 3 :], batch_size=2)
            return [p for _, p in got]
        return embed(body, tokenizer, texts, normalize=True)

    serial = [job(i) for i in range(THREADS)]
    threaded = in_threads(job)
    for i in range(THREADS):
        if i % 2 == 0:
            assert threaded[i] == serial[i]
        else:
            assert torch.equal(torch.as_tensor(threaded[i]), torch.as_tensor(serial[i]))
