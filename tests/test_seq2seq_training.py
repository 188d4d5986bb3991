"""Sequence-to-sequence training (T5, BART): collation (labels shifted behind the decoder start
token, padding -100), a loss over target tokens only, gradient accumulation weighted by target
tokens, LoRA on T5's q/v, and the text metrics of generated predictions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model
from test_train_helpers import tiny_recipe

from graft.loading import load_model, save_model
from graft.metrics import compute_metrics
from graft.nn import Attention
from graft.strategies import apply_strategy
from graft.tasks import TaskModel
from graft.tasks.seq2seq import shift_right
from graft.tokenizer import Tokenizer
from graft.train import Trainer


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 with a word-level tokenizer (token i is 'w<i>', eos appended as T5's does)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    hf_model("t5", "seq2seq").save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, 99)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def records(n: int = 8) -> list[dict[str, str]]:
    """Sources and targets of different lengths (so batches have padding on both sides)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        source = torch.randint(3, 99, (3 + i % 4,), generator=g).tolist()
        target = torch.randint(3, 99, (1 + (i * 3) % 5,), generator=g).tolist()
        out.append({"text": words(*source), "text_pair": words(*target)})
    return out


def test_collate_shifts_labels_behind_the_start_token_and_ignores_padding(t5_folder):
    model, tok = load_model(t5_folder, kernels=False), Tokenizer.from_folder(t5_folder)
    batch = model.head.collate(
        [{"text": words(5, 6, 7), "text_pair": words(8)}, {"text": words(9), "text_pair": words(10, 11, 12)}],
        tok,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [9, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, -100, -100], [10, 11, 12, 1]]
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 1, 0], [0, 10, 11, 12]]  # T5 starts with pad
    ref = hf_model("t5", "seq2seq")
    assert torch.equal(
        batch["decoder_input_ids"], ref.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    )
    assert shift_right(torch.tensor([[4, -100]]), 2, 1).tolist() == [[2, 4]]  # BART: eos starts, pad is 1


def test_loss_is_the_mean_over_target_tokens_and_padding_changes_nothing(t5_folder):
    """The padded batch's loss is the token-weighted mean of each record's own loss, and its
    gradients are the same as summing the records' (each weighted by its share of target tokens)."""
    model, tok = load_model(t5_folder, kernels=False), Tokenizer.from_folder(t5_folder)
    recs = records(4)
    batch = model.head.collate(recs, tok)
    loss = model(**batch).loss
    loss.backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = model.head.count(batch["labels"], batch)
    assert total == int((batch["labels"] != -100).sum()) and total < batch["labels"].numel()
    expected = 0.0
    for rec in recs:
        one = model.head.collate([rec], tok)
        n = model.head.count(one["labels"], one)
        part = model(**one).loss * n / total
        part.backward()
        expected += float(part.detach())
    assert abs(float(loss.detach()) - expected) <= 1e-5
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, together[name], atol=1e-6, rtol=1e-5, msg=name)


def train(folder, out, batch_size: int, accumulate: int) -> TaskModel:
    model, tok = load_model(folder, kernels=False), Tokenizer.from_folder(folder)
    for module in model.modules():  # no dropout: one batch and its pieces see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, Attention):
            module.dropout = 0.0
    recipe = tiny_recipe(
        out,
        train={"max_steps": 2, "batch_size": batch_size, "accumulate": accumulate},
        optim={"name": "sgd", "lr": 0.5},
    )
    Trainer(model, recipe, records(8), lambda r: model.head.collate(r, tok), quiet=True).fit()
    return model


def test_accumulation_weighs_target_tokens_exactly(t5_folder, tmp_path):
    """Micro-batches with different numbers of target tokens: accumulating them gives the step of
    one big batch (each token counts once), not the mean of the micro-batches' means."""
    big = train(t5_folder, tmp_path / "big", 4, 1)
    small = train(t5_folder, tmp_path / "small", 1, 4)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_lora_on_t5_q_and_v_trains_only_the_adapters_and_saves_merged(t5_folder, tmp_path):
    import transformers as tr

    model, tok = load_model(t5_folder), Tokenizer.from_folder(t5_folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_strategy(model, "lora")
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    # q and v of the encoder's self-attention, the decoder's self- and cross-attention: 2 + 3 + 3 layers
    assert len(lora) == 2 * 2 * (2 + 3 + 3)
    assert all(".q." in n or ".v." in n for n in lora)
    assert any("cross_attn.q" in n for n in lora) and any("encoder.layers.1.attn.v" in n for n in lora)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model.train()
        model(**model.head.collate(records(4), tok)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, p in model.named_parameters():
        if name not in lora:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    save_model(model, tmp_path / "merged")
    ref = tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    batch = model.head.collate(records(3), tok)
    with torch.no_grad():
        got = model(**batch).logits
        expected = ref(**{k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}).logits
    assert (got - before_lora_logits(t5_folder, batch)).abs().max() > 1e-4  # the adapters learned something
    assert (got - expected).abs().max() <= 1e-5


def before_lora_logits(folder, batch) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder, kernels=False)(**batch).logits


def test_evaluate_scores_generated_text_with_rouge_bleu_chrf_and_the_loss(t5_folder):
    model = load_model(t5_folder, kernels=False)
    recs = [{"text": "a", "text_pair": "the cat sat on the mat"}, {"text": "b", "text_pair": "a dog ran"}]
    predictions = [
        {"generated": "the cat sat on a mat", "nll": 3.0, "tokens": 6},
        {"generated": "the dog ran", "nll": 1.0, "tokens": 4},
    ]
    metrics = model.head.evaluate(predictions, recs)
    text = compute_metrics("seq2seq", [p["generated"] for p in predictions], [r["text_pair"] for r in recs])
    assert {k: metrics[k] for k in text} == text and {"rouge1", "rouge2", "rougeL", "bleu", "chrf"} <= set(
        text
    )
    assert metrics["loss"] == pytest.approx(0.4)


# ---- the command line: predict, eval and train a seq2seq model ----------------------------------


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_predict_and_eval_generate_and_score_texts(t5_folder, tmp_path, cli):
    from graft.generation import generate
    from graft.generation.text import decode_new

    recs = records(5)
    data = write_jsonl(tmp_path / "pairs.jsonl", recs)
    predicted = cli("predict", t5_folder, "--input", data, "--max-new-tokens", "6", "--num-beams", "2").ok()
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    model, tok = load_model(t5_folder), Tokenizer.from_folder(t5_folder)
    batch = model.head.collate(recs, tok)
    out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, num_beams=2)
    assert [line["generated"] for line in lines] == decode_new(tok, out[:, 1:], [1])
    assert any(line["generated"] for line in lines), lines  # not every row ends at once

    evaluated = cli("eval", t5_folder, "--data", data, "--max-new-tokens", "6", "--out", tmp_path / "ev").ok()
    metrics = json.loads(evaluated.stdout)
    greedy = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    text = compute_metrics("seq2seq", [p["generated"] for p in greedy], [r["text_pair"] for r in recs])
    assert {k: metrics[k] for k in text} == pytest.approx(text) and metrics["examples"] == 5
    tokens = sum(p["tokens"] for p in greedy)
    assert metrics["loss"] == pytest.approx(sum(p["nll"] for p in greedy) / tokens)


def test_eval_without_targets_is_one_line(t5_folder, tmp_path, cli):
    data = write_jsonl(tmp_path / "sources.jsonl", [{"text": "w5 w6"}])
    error = cli("eval", t5_folder, "--data", data).error_line()
    assert error.startswith(f"error: {data}") and "text_pair" in error, error


def test_train_a_seq2seq_recipe_evaluates_with_rouge(t5_folder, tmp_path, cli):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    data = write_jsonl(tmp_path / "train.jsonl", records(12))
    done = cli(
        "train", root / "recipes" / "seq2seq.yaml", f"model.path={t5_folder}", f"data.train={data}",
        f"train.output={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=4", "train.plots=false",
        "data.val_fraction=0.25", "task.max_new_tokens=4", "data.max_length=16", "-q",
    ).ok()  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"eval/rougeL", "eval/bleu", "eval/chrf", "eval/loss"} <= set(result), result
    trained = load_model(tmp_path / "run" / "model")
    assert isinstance(trained, TaskModel) and trained.task == "seq2seq"


def test_graft_generate_runs_an_encoder_decoder_on_its_prompts(t5_folder, cli):
    from graft.generation import generate
    from graft.generation.text import decode_new, encode_prompts

    prompts = [words(5, 6, 7), words(8)]
    done = cli("generate", t5_folder, "-p", prompts[0], "-p", prompts[1], "-n", "5", "--json").ok()
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    model, tok = load_model(t5_folder), Tokenizer.from_folder(t5_folder)
    ids, mask = encode_prompts(tok, prompts, side="right")
    expected = decode_new(tok, generate(model, ids, mask, max_new_tokens=5)[:, 1:], [1])
    assert [line["prompt"] for line in lines] == prompts
    assert [line["completion"] for line in lines] == expected
    one = cli("generate", t5_folder, "-p", prompts[1], "-n", "5").ok()
    assert one.stdout == expected[1] + "\n"


def test_info_shows_both_depths_of_an_encoder_decoder(t5_folder, cli):
    facts = json.loads(cli("info", t5_folder, "--json").ok().stdout)
    model = load_model(t5_folder, kernels=False)
    assert facts["family"] == "t5" and (facts["encoder_layers"], facts["decoder_layers"]) == (2, 3)
    assert facts["parameters"] == sum(p.numel() for p in model.body.parameters())


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_every_strategy_trains_an_encoder_decoder_or_says_why_not(family, tmp_path):
    """Each strategy of the registry, with layer-wise learning rates: gradients reach every parameter
    it trains, or one line names what does not apply (prompts, prefixes, cached features; BitFit on
    T5, which has no biases)."""
    from graft.errors import GraftError
    from graft.strategies import STRATEGIES

    hf_model(family, "seq2seq").save_pretrained(tmp_path)
    refused = {name for name, cls in STRATEGIES.items() if not cls.encoder_decoders}
    assert refused == {"features", "prompt", "prefix"}
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 99, (2, 6), generator=g),
        "decoder_input_ids": torch.randint(3, 99, (2, 4), generator=g),
    }
    batch["labels"] = batch["decoder_input_ids"]
    for name in STRATEGIES:
        model = load_model(tmp_path)
        if name in refused or (name == "bitfit" and family == "t5"):
            why = "has no biases to train" if name == "bitfit" else "does not apply to an encoder-decoder"
            with pytest.raises(
                GraftError,
                match=f"^strategy '{name}': a t5 model {why}|^strategy '{name}' {why} \\({family}\\); use ",
            ):
                apply_strategy(model, name)
            continue
        model = apply_strategy(model, f"{name}:lr_decay=0.8")
        model.train()
        model(**batch).loss.backward()
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(p.grad is not None for _, p in trained), name
        groups = model.strategy.param_groups(model, 1e-3)
        assert sum(len(g["params"]) for g in groups) == len(trained)
        lrs = sorted({g["lr"] for g in groups})
        assert len(lrs) > 2, (name, lrs)  # encoder and decoder blocks at their own depths


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_lora_adapters_round_trip_with_peft(family, tmp_path):
    """PEFT's q/v adapter on transformers' model loads into graft with the same logits, and graft's
    saved adapter loads into PEFT on transformers' model with graft's logits."""
    import peft
    import transformers as tr

    from graft.loading import load_adapter_model
    from graft.strategies.lora import save_adapter

    ref = hf_model(family, "seq2seq")
    with torch.no_grad():
        for name, buffer in ref.named_buffers():
            if name.endswith("final_logits_bias"):
                buffer.add_(torch.randn_like(buffer))
    ref.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(
        ref,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q", "v"] if family == "t5" else ["q_proj", "v_proj"],
            task_type="SEQ_2_SEQ_LM",
        ),
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(3, 99, (2, 6), generator=g), torch.randint(3, 99, (2, 4), generator=g)
    ours = load_adapter_model(tmp_path / "base", tmp_path / "peft")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, decoder_input_ids=dec).logits
        assert (ours(input_ids=ids, decoder_input_ids=dec).logits - expected).abs().max() <= 1e-5

    model = apply_strategy(load_model(tmp_path / "base"), "lora:r=2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        got = model.eval()(input_ids=ids, decoder_input_ids=dec).logits
    save_adapter(model, tmp_path / "ours")
    base = tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids, decoder_input_ids=dec).logits - got).abs().max() <= 1e-5
    assert (got - expected).abs().max() > 1e-3  # different adapters: the comparison means something
