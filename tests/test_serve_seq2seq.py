"""``graft serve`` on an encoder-decoder over text (T5, mT5, BART, mBART: every such family of the
registry): /predict gives graft predict's {"generated": ...}, /v1/completions the same text in
OpenAI's shape, generated in batches by the token-budget queue; what only a causal LM has is a 422
naming the field (Whisper: tests/test_serve_audio.py; images: tests/test_serve_images.py).
"""

from __future__ import annotations

import json

import pytest
from conftest import hf_model, tiny_hf_config
from test_serve import Server, sse

from graft.loading import load_config
from graft.models import FAMILIES


def inputs_of(family: str) -> str:
    """What a family's model reads: tokens, patches (images), audio_frames, or image-text (CLIP)."""
    cfg = FAMILIES[family].config_from_hf(tiny_hf_config(family).to_dict())
    return getattr(getattr(cfg, "encoder", cfg), "inputs", FAMILIES[family].inputs)


TEXT_SEQ2SEQ = [name for name, f in FAMILIES.items() if f.encoder_decoder and inputs_of(name) == "tokens"]
TEXTS = ["w5 w6 w7", "w8", "w9 w10 w11 w12 w13"]


def seq2seq_folder(folder, family: str):
    """A tiny random encoder-decoder of ``family`` with a word-level tokenizer (token i is 'w<i>',
    the config's special tokens at their ids, end-of-text appended)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    model = hf_model(family, "seq2seq")
    model.save_pretrained(folder)
    cfg = model.config
    special = {cfg.pad_token_id: "<pad>", cfg.eos_token_id: "</s>", 3: "<unk>"}
    if getattr(cfg, "bos_token_id", None) is not None:
        special[cfg.bos_token_id] = "<s>"
    vocab = {special.get(i, f"w{i}"): i for i in range(cfg.vocab_size)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = ("</s>", cfg.eos_token_id)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[eos])
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_every_text_encoder_decoder_is_served():
    assert {"bart", "mbart", "t5", "mt5"} <= set(TEXT_SEQ2SEQ)


@pytest.mark.parametrize("family", TEXT_SEQ2SEQ)
def test_predict_and_completions_give_what_the_library_generates(family, tmp_path, cli):
    folder = seq2seq_folder(tmp_path / family, family)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(TEXTS)))
    expected = [json.loads(line) for line in cli("predict", folder, "--input", data, "--max-new-tokens", "8").ok().stdout.splitlines()]  # fmt: skip
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        c = server.client
        assert c.get("/info").json()["task"] == "seq2seq"
        records = [{"text": t, "id": str(i)} for i, t in enumerate(TEXTS)]
        got = c.post("/predict", json={"inputs": records, "max_new_tokens": 8}).json()["predictions"]
        assert got == expected  # graft predict's JSON lines

        ids = [c.post("/tokenize", json={"input": t}).json()["ids"][0] for t in TEXTS]
        answer = c.post("/v1/completions", json={"prompt": TEXTS, "max_tokens": 8, "temperature": 0}).json()
        assert [ch["text"] for ch in answer["choices"]] == [e["generated"] for e in expected]
        assert [ch["index"] for ch in answer["choices"]] == [0, 1, 2]
        assert answer["object"] == "text_completion" and answer["usage"]["prompt_tokens"] == sum(
            map(len, ids)
        )
        by_ids = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
        assert [ch["text"] for ch in by_ids["choices"]] == [ch["text"] for ch in answer["choices"]]
        new = answer["usage"]["completion_tokens"]
        assert 0 <= new <= 24 and answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + new
        assert all(ch["finish_reason"] in ("stop", "length") for ch in answer["choices"])

        body = {
            "prompt": TEXTS[0],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = sse(r)
        texts = [e["choices"][0]["text"] for e in events if e["choices"]]
        reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert "".join(texts) == expected[0]["generated"] and events[-1]["usage"]["prompt_tokens"]
        assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
        # streamed as it is decoded: a word (a token) an event
        assert len([t for t in texts if t]) == len(expected[0]["generated"].split())

        # several prompts, each choice by its index; a stop string ends a choice as unstreamed
        words = [e["generated"].split() for e in expected]
        stop = next((w[1] for w in words if len(w) > 1), "w5")
        both = {"prompt": TEXTS, "max_tokens": 8, "temperature": 0, "stop": [stop]}
        whole = c.post("/v1/completions", json=both).json()["choices"]
        with c.stream("POST", "/v1/completions", json={**both, "stream": True}) as r:
            events = sse(r)
        for ch in whole:
            mine = [
                e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == ch["index"]
            ]
            assert "".join(m["text"] for m in mine) == ch["text"]
            assert [m["finish_reason"] for m in mine][-1] == ch["finish_reason"]

        for field, value in (("logprobs", 1), ("echo", True), ("n", 2), ("logit_bias", {"5": 1}),
                             ("guided_regex", "w5")):  # fmt: skip
            error = c.post("/v1/completions", json={"prompt": "w5", field: value}).json()["error"]
            assert error["param"] == field and "for a causal LM" in error["message"]
        error = c.post("/predict", json={"inputs": "w5", "threshold": 0.5}).json()["error"]
        assert error["param"] == "threshold"
        window = c.get("/info").json()["max_length"]  # the encoder's
        long = c.post("/v1/completions", json={"prompt": [5] * (window + 1)})
        assert long.status_code == 413 and f"at most {window}" in long.json()["error"]["message"]
        streamed = c.post("/v1/completions", json={"prompt": [5] * (window + 1), "stream": True})
        assert streamed.status_code == 413  # refused before its first token: not a stream
        cut = c.post(
            "/v1/completions", json={"prompt": [5] * (window + 1), "truncate": True, "max_tokens": 2}
        )
        assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == window
        # max_tokens past the decoder's positions: as many as they hold (a causal LM's window rule)
        room = (
            load_config(folder)[1].decoder.max_positions - load_config(folder)[1].decoder.first_position - 1
        )
        big = c.post("/v1/completions", json={"prompt": "w5", "max_tokens": 100000, "temperature": 0})
        assert big.status_code == 200 and big.json()["usage"]["completion_tokens"] <= room
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w5"}]})
        assert chat.status_code == 400 and "/v1/completions" in chat.json()["error"]["message"]
        assert c.post("/embed", json={"inputs": "w5"}).status_code == 400
    finally:
        server.close()


def test_streamed_rows_get_each_token_as_it_comes_and_stop_when_no_one_reads(tmp_path):
    """seq2seq_generate with sinks: every streamed row's sink sees its tokens in order (the same
    tokens the whole generation gives, end-of-text last), and once every reader has gone, the batch
    stops at the next step instead of decoding to max_new_tokens."""
    from graft.serve.app import Streamed, seq2seq_generate
    from graft.serve.model import load_served

    served = load_served(str(seq2seq_folder(tmp_path / "t5", "t5")))
    prompts = [served.tokenizer.encode(t, return_tensors=None).input_ids[0] for t in TEXTS]
    options = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}  # no early end-of-text
    whole = seq2seq_generate(served, prompts, options)
    seen: list[list[int]] = [[] for _ in prompts]
    streamed = seq2seq_generate(
        served,
        [Streamed(p, lambda t, ends, i=i: seen[i].append(t) is None) for i, p in enumerate(prompts)],
        options,
    )
    assert streamed == whole and [s[: len(new)] for s, (new, _) in zip(seen, whole, strict=True)] == [
        new for new, _ in whole
    ]
    gone = seq2seq_generate(served, [Streamed(p, lambda t, ends: False) for p in prompts], options)
    assert all(len(new) == 1 for new, _ in gone)  # each reader left after the first token: one step
