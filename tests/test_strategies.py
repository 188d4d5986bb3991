"""Strategies, specified: what trains, what stays bitwise unchanged, and PEFT interoperability."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import hf_model, padded_batch, tiny_hf_config

from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.strategies import (
    CachedFeatures,
    LoRALinear,
    apply_strategy,
    count_parameters,
    load_adapter,
    merge,
    merge_and_unload,
    parse_strategy,
    save_adapter,
    unmerge,
)
from graft.tasks.base import TaskModel
from graft.tasks.classification import ClassificationHead

# every encoder family, and GPT-2 for the decoders
# one stack over tokens each; encoder-decoders: tests/test_seq2seq_training.py (every strategy on T5 and BART)
TESTED = sorted(
    name for name, f in FAMILIES.items() if not f.decoder and not f.encoder_decoder and f.inputs == "tokens"
) + ["gpt2"]
NUM_LABELS = 3


def head_only(name: str) -> bool:
    return name.startswith("head.")


# strategy -> which TaskModel parameters (by name) must train; all others must not change at all
TABLE = {
    "full": lambda n: True,
    "freeze:1": lambda n: not n.startswith(("body.embed.", "body.layers.0.")),
    "freeze:layers=0,embeddings=false": lambda n: True,
    "features": head_only,
    "bitfit": lambda n: head_only(n) or n.endswith("bias"),
    "lora": lambda n: head_only(n) or ".lora_" in n,
    "lora:r=2,alpha=4,targets=q+k+v+o+up+down,rslora=true,dropout=0.1": lambda n: (
        head_only(n) or ".lora_" in n
    ),
    "adapter:size=16": lambda n: head_only(n) or ".adapter." in n,
    "adapter:pfeiffer,size=4,activation=gelu,train_norms=true": lambda n: (
        head_only(n) or ".ffn.adapter." in n or (n.startswith("body.layers.") and "_norm." in n)
    ),
    "prompt:4": lambda n: head_only(n) or n.startswith("body.embed.prompt."),
    "prompt:tokens=2,init=random": lambda n: head_only(n) or n.startswith("body.embed.prompt."),
    "prefix:4": lambda n: head_only(n) or ".attn.prefix." in n,
    "prefix:tokens=3,projection=8": lambda n: head_only(n) or ".attn.prefix." in n,
}


def test_every_registered_strategy_has_a_table_row():
    """A new strategy without a case in TABLE fails here, so every test looping over TABLE covers it."""
    from graft.strategies import STRATEGIES

    assert {parse_strategy(spec).name for spec in TABLE} == set(STRATEGIES)


def hf_classifier(family: str):
    """A random tiny transformers *ForSequenceClassification of ``family`` with 3 labels."""
    torch.manual_seed(0)
    config = tiny_hf_config(family)
    config.num_labels = NUM_LABELS
    if config.pad_token_id is None:
        config.pad_token_id = 0  # GPT-2 finds each row's last token by the pad id
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def task_model(family: str, folder) -> TaskModel:
    """graft's classifier on the body of a saved tiny HF classifier (the head is new)."""
    body = load_model(folder, task="base")
    torch.manual_seed(1)
    return TaskModel(body, ClassificationHead(body, num_labels=NUM_LABELS))


@pytest.fixture(params=TESTED)
def family(request) -> str:
    return request.param


@pytest.fixture
def saved(family, tmp_path):
    ref = hf_classifier(family)
    ref.save_pretrained(tmp_path / "ref")
    return ref, tmp_path / "ref"


@pytest.fixture
def bert(tmp_path):
    hf_classifier("bert").save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def batch(labels: bool = True) -> dict[str, torch.Tensor]:
    ids, mask = padded_batch()
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = torch.tensor([0, 1, 2])
    return out


def randomize_lora(model, scale: float = 0.1) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, scale)


@pytest.mark.parametrize("spec", list(TABLE))
def test_only_intended_parameters_change(family, spec, saved):
    model = apply_strategy(task_model(family, saved[1]), spec)
    intended = TABLE[spec]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if intended(n)}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01
    )
    model.train()
    for _ in range(2):  # LoRA's A (and an adapter's down projection) get a gradient once B is non-zero
        optimizer.zero_grad()
        model(**batch()).loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if intended(name):
            assert p.grad is not None and not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"{name} changed"


def test_strategies_wrap_modules_and_register_no_hooks(family, saved):
    """Wrap, don't hook: after any strategy, no module (nor torch globally) has a forward or
    forward-pre hook, and the body's modules that strategies replace are wrappers that keep them."""
    from torch.nn.modules import module as torch_module

    from graft.strategies import PrefixAttention, PromptEmbeddings
    from graft.strategies.adapter import Adapted

    for spec in TABLE:
        model = apply_strategy(task_model(family, saved[1]), spec)
        for name, m in model.named_modules():
            assert not (m._forward_hooks or m._forward_pre_hooks), f"{spec}: {name} has a forward hook"
        assert not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks), spec
        body = model.body
        wrapped = {
            "prompt": isinstance(body.embed, PromptEmbeddings),
            "prefix": all(isinstance(b.attn, PrefixAttention) for b in body.layers),
            "adapter": all(isinstance(b.ffn, Adapted) for b in body.layers),
        }
        name = parse_strategy(spec).name
        assert wrapped.get(name, True), f"{spec}: the body's modules are not wrapped"


def test_parameter_counts_are_reported(bert, caplog):
    model = task_model("bert", bert)
    total = count_parameters(model).total
    with caplog.at_level("INFO", logger="graft"):
        model = apply_strategy(model, "lora:r=4")
    count = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = sum(p.numel() for p in model.head.parameters())
    assert count.total == total + lora and count.trainable == lora + head
    assert f"{count.trainable:,} of {count.total:,}" in caplog.text


def test_strategy_strings_parse_and_errors_name_the_option():
    assert parse_strategy("freeze:4").layers == 4
    lora = parse_strategy("lora:r=4,alpha=8,targets=query+value,pattern=.*\\.(q|v)")
    assert (lora.r, lora.alpha, lora.targets, lora.pattern) == (4, 8.0, ["query", "value"], ".*\\.(q|v)")
    assert parse_strategy(lora.spec()) == lora
    assert parse_strategy("lora", {"r": 16, "rslora": True}).rslora
    with pytest.raises(GraftError, match="unknown option 'rank'.*"):
        parse_strategy("lora:rank=4")
    with pytest.raises(GraftError, match="did you mean 'lora'"):
        parse_strategy("lroa")
    with pytest.raises(GraftError, match="option 'r' must be positive"):
        parse_strategy("lora:r=0")
    with pytest.raises(GraftError, match="option 'layers': expected int"):
        parse_strategy("freeze:two")


def test_features_run_the_body_once_per_example(bert):
    model = task_model("bert", bert)
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
    cached = apply_strategy(model, "features")
    assert isinstance(cached, CachedFeatures)
    cached.train()
    for _ in range(3):
        out = cached(**batch())
    assert cached.body_calls == 1 and len(cached.cache) == 3
    cached.eval()
    with torch.no_grad():
        assert (cached(**batch()).logits - expected).abs().max() <= 1e-6
    assert set(cached.state_dict()) == set(model.state_dict())
    assert out.loss is not None


def test_lora_merge_equals_unmerged_and_unmerge_restores(family, saved):
    model = apply_strategy(task_model(family, saved[1]), "lora:targets=q+k+v+o+up+down")
    randomize_lora(model)
    model.eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(**batch()).logits
        merge(model)
        merged = model(**batch()).logits
        unmerge(model)
        again = model(**batch()).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        if n in base:
            assert (p - base[n]).abs().max() <= 1e-6
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        assert (plain(**batch()).logits - unmerged).abs().max() <= 1e-5


def test_lora_merge_refuses_non_finite_weights(bert):
    model = apply_strategy(task_model("bert", bert), "lora")
    lora = model.body.layers[0].attn.q
    before = lora.base_layer.weight.detach().clone()
    with torch.no_grad():
        lora.lora_A.weight.fill_(1e30)
        lora.lora_B.weight.fill_(1e30)
    with pytest.raises(GraftError, match="non-finite"):
        lora.merge()
    assert torch.equal(lora.base_layer.weight, before) and not lora.merged


def test_lora_targets_accept_hf_names_and_regex(bert):
    folder = bert
    by_hf = apply_strategy(task_model("bert", folder), "lora:targets=query+value")
    by_graft = apply_strategy(task_model("bert", folder), "lora:targets=attn.q+v")
    by_regex = apply_strategy(task_model("bert", folder), "lora:pattern=layers\\.\\d+\\.attn\\.(q|v)")
    names = [
        sorted(n for n, m in x.named_modules() if isinstance(m, LoRALinear))
        for x in (by_hf, by_graft, by_regex)
    ]
    assert names[0] == names[1] == names[2] == [f"body.layers.{i}.attn.{p}" for i in (0, 1) for p in "qv"]
    with pytest.raises(GraftError, match="no Linear layer matches"):
        apply_strategy(task_model("bert", folder), "lora:targets=c_attn")


PEFT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "albert": ["query", "value"],
                "distilbert": ["q_lin", "v_lin"], "gpt2": ["c_attn"]}  # fmt: skip


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_graft_adapter_with_the_same_logits(family, saved, tmp_path, rslora):
    from peft import PeftModel

    ref, folder = saved
    targets = "+".join(PEFT_TARGETS.get(family, ["q", "v"]))
    model = apply_strategy(task_model(family, folder), f"lora:r=4,alpha=8,targets={targets},rslora={rslora}")
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        expected = model(**batch(labels=False)).logits
        got = peft_model(**batch(labels=False)).logits
    assert expected.abs().max() > 1e-3
    assert (expected - got).abs().max() <= 1e-5


def test_peft_loads_gpt2_q_and_v_as_a_fused_c_attn(tmp_path):
    from peft import PeftModel

    ref = hf_classifier("gpt2")
    ref.save_pretrained(tmp_path / "ref")
    model = apply_strategy(task_model("gpt2", tmp_path / "ref"), "lora:r=2,targets=q+v")
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        assert (
            model(**batch(labels=False)).logits - peft_model(**batch(labels=False)).logits
        ).abs().max() <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_graft_loads_peft_adapter_with_the_same_logits(family, saved, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    ref, folder = saved
    modules_to_save = sorted(
        {n.split(".")[0] for n in ClassificationHead(load_model(folder, task="base")).hf_names()}
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[family], use_rslora=rslora,
                        modules_to_save=modules_to_save)  # fmt: skip
    peft_model = get_peft_model(ref, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    model = load_adapter(task_model(family, folder), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = peft_model(**batch(labels=False)).logits
        got = model(**batch(labels=False)).logits
    assert (expected - got).abs().max() <= 1e-5


def test_adapter_checkpoint_and_base_model_reload_to_the_same_predictions(family, saved, tmp_path):
    from graft.loading import load_adapter_model
    from graft.tasks import HEADS

    if "classification" not in HEADS:
        pytest.skip("the classification head is not registered yet")
    model = apply_strategy(task_model(family, saved[1]), "lora:targets=q+v+down")
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter_model(saved[1], tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, again(**batch()).logits)


# ------------------------------------------------------------------------ adapters, prompt, prefix


def test_adapters_start_as_the_identity_and_come_out_again(family, saved):
    from graft.strategies import remove_adapters

    model = task_model(family, saved[1]).eval()
    with torch.no_grad():
        expected = model(**batch()).logits
        adapted = apply_strategy(model, "adapter:size=8").eval()
        assert torch.equal(adapted(**batch()).logits, expected)
        for m in adapted.modules():
            if hasattr(m, "adapter"):
                m.adapter.up.weight.normal_()
        assert not torch.equal(adapted(**batch()).logits, expected)
        remove_adapters(adapted)
        assert torch.equal(adapted(**batch()).logits, expected)
    assert not any("adapter" in n for n in adapted.state_dict())


def test_prompt_of_token_embeddings_equals_those_tokens_in_the_input(family, saved):
    body = load_model(saved[1], task="base").eval()
    ids, mask = padded_batch()
    prompt_ids = torch.tensor([5, 6, 7])
    with torch.no_grad():
        full = body(
            torch.cat([prompt_ids.expand(3, -1), ids], 1),
            torch.cat([torch.ones(3, 3, dtype=torch.long), mask], 1),
        )
        apply_strategy(body, "prompt:3")
        body.embed.prompt.weight.copy_(body.embed.base.tokens.weight[prompt_ids])
        got = body(ids, mask, output_hidden_states=True)
    assert got.last_hidden_state.shape == (3, 9, body.config.hidden_size)
    assert [h.shape[1] for h in got.hidden_states] == [9] * (body.config.num_layers + 1)
    keep = mask.bool()
    assert (got.last_hidden_state[keep] - full.last_hidden_state[:, 3:][keep]).abs().max() <= 1e-5


def test_prefix_of_real_keys_and_values_equals_those_tokens_before_the_input(tmp_path):
    """In a causal model a prefix's keys and values do not depend on what follows: learned ones
    set to those of real tokens must give exactly the outputs of those tokens put before the input."""
    from graft.nn import KVCache

    hf_classifier("gpt2").save_pretrained(tmp_path)
    body = load_model(tmp_path, task="base").eval()
    P, T = 4, 6
    ids = torch.randint(3, 99, (1, P + T)).expand(2, -1).clone()
    ids[1, P:] = torch.randint(3, 99, (T,))  # the same prefix, different continuations
    cache = KVCache(body.config.num_blocks)
    with torch.no_grad():
        full = body(ids).last_hidden_state[:, P:]
        body(ids[:, :P], cache=cache)
        apply_strategy(body, f"prefix:{P}")
        for layer in range(body.config.num_blocks):
            k, v = cache.keys[layer][0, :, :P], cache.values[layer][0, :, :P]  # (nkv, P, hd)
            prefix = body.layers[layer].attn.prefix
            prefix.keys.copy_(k.transpose(0, 1).reshape(P, -1))
            prefix.values.copy_(v.transpose(0, 1).reshape(P, -1))
        got = body(ids[:, P:], position_ids=torch.arange(P, P + T).expand(2, -1))
    assert got.cache is None
    assert (got.last_hidden_state - full).abs().max() <= 1e-5


def test_strategies_give_the_same_outputs_on_kernels_and_on_the_reference(family, saved):
    """Wrapped modules (LoRA, adapters, prompt, prefix) run on graft's kernels and on the plain
    reference model with the same logits and gradients."""
    from graft import kernels

    for spec in TABLE:
        model = apply_strategy(task_model(family, saved[1]), spec)
        randomize_lora(model)
        model.eval()
        results = []
        for mode in (kernels.optimize, kernels.reference):
            mode(model)
            model.zero_grad()
            out = model(**batch())
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((out.logits.detach(), grads))
        (fast, fast_grads), (ref, ref_grads) = results
        assert (fast - ref).abs().max() <= 1e-5, spec
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(fast_grads, ref_grads, strict=True)), spec


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal_lm(request, tmp_path_factory):
    """A tiny causal LM saved to a folder: learned positions (GPT-2) or rotary ones (Llama)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model(request.param, "causal-lm").save_pretrained(folder)
    return folder


def test_prompt_tuned_generation_equals_those_tokens_before_the_input(causal_lm):
    """Greedy decoding with the KV cache, left padding: a prompt set to the embeddings of real
    tokens generates what those tokens put before each row's input generate."""
    from graft.generation import generate

    ids, mask = padded_batch("left")
    prompt_ids = torch.tensor([5, 6, 7])
    with torch.no_grad():
        plain = load_model(causal_lm)
        ones = torch.ones(3, 3, dtype=torch.long)
        expected = generate(plain, torch.cat([prompt_ids.expand(3, -1), ids], 1), torch.cat([ones, mask], 1),
                            max_new_tokens=6, eos_token_id=None)  # fmt: skip
        model = apply_strategy(load_model(causal_lm), "prompt:3").eval()
        model.body.embed.prompt.weight.copy_(model.body.embed.base.tokens.weight[prompt_ids])
        got = generate(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(got, expected[:, 3:])


@pytest.mark.parametrize("spec", ["prompt:3", "prefix:3", "prefix:tokens=2,projection=8"])
def test_prompt_and_prefix_tuned_decoding_with_the_cache_equals_recomputing_each_step(causal_lm, spec):
    """Decoding through the KV cache (the prompt's virtual tokens are cached, each layer's prefix
    precedes the cache), left padding: each step's logits are those of running the whole sequence."""
    from graft.generation import Decoder, positions_from_mask

    ids, mask = padded_batch("left")
    tokens = torch.randint(3, 99, (3, 4), generator=torch.Generator().manual_seed(5))  # fed at each step
    model = apply_strategy(load_model(causal_lm), spec).eval()
    with torch.no_grad():
        torch.manual_seed(4)
        for p in model.parameters():
            if p.requires_grad:  # far from the start, so that the prompt or prefix steers the model
                p.normal_(0, 1)
        decoder = Decoder(model, ids, mask, tokens.shape[1] + 1)
        cached = [decoder.prefill()] + [decoder.step(tokens[:, i]) for i in range(tokens.shape[1])]
        for step, logits in enumerate(cached):
            seq = torch.cat([ids, tokens[:, :step]], 1)
            full = torch.cat([mask, torch.ones(3, step, dtype=torch.long)], 1)
            expected = model(
                input_ids=seq, attention_mask=full, position_ids=positions_from_mask(full)
            ).logits
            assert (logits - expected[:, -1]).abs().max() <= 1e-5
        plain = load_model(causal_lm)(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
        )
    assert (cached[0] - plain.logits[:, -1]).abs().max() > 1e-2  # the learned tokens change the logits


@pytest.mark.parametrize("spec", ["prompt:3", "prefix:tokens=2,projection=8"])
def test_prompt_and_prefix_tuned_lms_reload_and_generate_the_same_tokens(causal_lm, spec, tmp_path):
    from graft.generation import generate
    from graft.loading import load_trained
    from graft.strategies import save_trained

    model = apply_strategy(load_model(causal_lm), spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    ids, mask = padded_batch()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
    save_trained(model, tmp_path / "trained")
    again = load_trained(causal_lm, tmp_path / "trained")
    model.eval()
    ids, mask = padded_batch("left")
    with torch.no_grad():
        expected = generate(model, ids, mask, max_new_tokens=5, eos_token_id=None)
        assert torch.equal(generate(again, ids, mask, max_new_tokens=5, eos_token_id=None), expected)
    with pytest.raises(GraftError, match="strategy modules .* that a Hugging Face checkpoint cannot hold"):
        save_model(model, tmp_path / "hf")


def test_prompt_tuned_generation_leaves_room_for_the_virtual_tokens(caplog):
    """The context window holds the prompt's virtual tokens too: a long input is cut to fit them."""
    from graft.generation import generate
    from graft.nn import Transformer, TransformerConfig
    from graft.tasks.causal_lm import LMHead

    cfg = TransformerConfig(family="gpt2", vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
                            intermediate_size=16, max_positions=16, causal=True, prenorm=True)  # fmt: skip
    body = Transformer(cfg)
    model = apply_strategy(TaskModel(body, LMHead(body)), "prompt:3").eval()
    ids = torch.randint(3, 20, (1, 12))
    with torch.no_grad(), caplog.at_level("WARNING", logger="graft"):
        out = generate(model, ids, max_new_tokens=4, eos_token_id=None)  # 3 + 12 + 4 > 16 positions
    assert torch.equal(out[:, :9], ids[:, -9:]) and out.shape == (1, 13)
    assert "keeping its last 9 tokens" in caplog.text


@pytest.mark.slow
def test_compiled_decoding_of_a_prefix_tuned_model_gives_the_eager_logits(tmp_path):
    """The compiled step runs each layer's prefix before its fixed-size cache (bf16, to bf16's rounding)."""
    from graft.generation import Decoder

    hf_model("llama", "causal-lm").save_pretrained(tmp_path)
    model = apply_strategy(load_model(tmp_path, dtype=torch.bfloat16), "prefix:3").eval()
    ids, mask = padded_batch("left")
    tokens = torch.randint(3, 99, (3, 5), generator=torch.Generator().manual_seed(2))
    runs = []
    with torch.inference_mode():
        for compile in (False, True):
            decoder = Decoder(model, ids, mask, tokens.shape[1] + 1, compile=compile)
            logits = [decoder.prefill()] + [decoder.step(tokens[:, i]) for i in range(tokens.shape[1])]
            runs.append(torch.stack(logits).float())
    eager, compiled = runs
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


# ---------------------------------------------------------- learning rates and gradual unfreezing


def test_layerwise_learning_rates_decay_from_the_top(bert):
    strategy = parse_strategy("full:lr_decay=0.5")
    model = strategy.apply(task_model("bert", bert))
    groups = strategy.param_groups(model, lr=1.0, weight_decay=0.01)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.out.weight"])] == 1.0
    assert lr_of[id(named["body.layers.1.attn.q.weight"])] == 0.5
    assert lr_of[id(named["body.layers.0.attn.q.weight"])] == 0.25
    assert lr_of[id(named["body.embed.tokens.weight"])] == 0.125
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(named["body.layers.0.attn.q.bias"])] == 0.0
    assert decay_of[id(named["body.layers.0.attn.q.weight"])] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_gradual_unfreezing_opens_one_layer_per_stage(bert):
    model = apply_strategy(task_model("bert", bert), "lora:unfreeze=1")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    randomize_lora(model)  # so that every LoRA A gets a gradient

    def step_changes(epoch: int) -> set[str]:
        model.unfreezing.set_epoch(epoch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        model(**batch()).loss.backward()
        optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    assert step_changes(0) == {"head.out.weight", "head.out.bias"}
    assert {n.split(".lora")[0] for n in step_changes(1) if "lora" in n} == {
        "body.layers.1.attn.q",
        "body.layers.1.attn.v",
    }
    assert any(n.startswith("body.layers.0.") for n in step_changes(2))


# --------------------------------------------------------------------------------------- multitask


def test_task_sampling_is_proportional_or_tempered():
    from graft.strategies import MultitaskLoader, task_probabilities

    assert task_probabilities({"a": 300, "b": 100}) == {"a": 0.75, "b": 0.25}
    tempered = task_probabilities({"a": 300, "b": 100}, temperature=2.0)
    assert tempered["a"] == pytest.approx(3**0.5 / (3**0.5 + 1))
    assert task_probabilities({"a": 300, "b": 100}, temperature=1e9)["b"] == pytest.approx(0.5)
    loader = MultitaskLoader(
        {"a": [{"x": i} for i in range(300)], "b": [{"x": i} for i in range(100)]}, steps=4000
    )
    drawn = [b["task"] for b in loader]
    assert len(drawn) == 4000 and drawn.count("a") / 4000 == pytest.approx(0.75, abs=0.03)


def test_multitask_model_shares_the_body_and_keeps_a_head_per_task(bert):
    from graft.strategies import MultitaskLoader, MultitaskModel

    body = load_model(bert, task="base")
    model = MultitaskModel(
        body, {"three": ClassificationHead(body, num_labels=3), "two": ClassificationHead(body, num_labels=2)}
    )
    model = apply_strategy(model, "lora")
    two = {**batch(), "labels": torch.tensor([0, 1, 1])}
    loader = MultitaskLoader({"three": [batch()], "two": [two]}, steps=6, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tasks = []
    for b in loader:
        optimizer.zero_grad()
        out = model(**b)
        assert out.logits.shape == (3, 3 if b["task"] == "three" else 2)
        out.loss.backward()
        optimizer.step()
        tasks.append(b["task"])
    assert set(tasks) == {"three", "two"}
    with pytest.raises(GraftError, match="not one of three, two"):
        model(**batch(), task="four")


# -------------------------------------------------------------------------------- continual learning


def forgetting_tasks():
    """Task A: label 1 when token 2 is present (fillers 3..10); task B: the opposite (fillers 11..19)."""

    def task(lo: int, hi: int, flip: bool, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(lo, hi, (128, 8), generator=g)
        has = torch.randint(0, 2, (128,), generator=g)
        where = torch.randint(0, 8, (128,), generator=g)
        ids[has == 1, where[has == 1]] = 2
        return ids, 1 - has if flip else has

    return task(3, 11, False, 0), task(11, 20, True, 1)


def batches_of(data, seed: int = 0, size: int = 32) -> list[dict[str, torch.Tensor]]:
    ids, labels = data
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return [
        {"input_ids": ids[order[i : i + size]], "labels": labels[order[i : i + size]]}
        for i in range(0, len(ids), size)
    ]


def fit(model, data, epochs: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for epoch in range(epochs):
        for b in batches_of(data, epoch):
            optimizer.zero_grad()
            model(**b).loss.backward()
            optimizer.step()


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return (model(input_ids=data[0]).logits.argmax(-1) == data[1]).float().mean().item()


def test_ewc_and_rehearsal_forget_task_a_less_than_sequential_fine_tuning():
    import copy

    from graft.nn import Transformer, TransformerConfig
    from graft.strategies import EWC, RehearsalBuffer

    torch.manual_seed(0)
    cfg = TransformerConfig(family="bert", vocab_size=20, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_positions=8, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    body = Transformer(cfg)
    model = TaskModel(body, ClassificationHead(body, num_labels=2, pooling="mean", dropout=0.0))
    task_a, task_b = forgetting_tasks()
    fit(model, task_a, epochs=6)
    learned = accuracy(model, task_a)

    plain = copy.deepcopy(model)
    fit(plain, task_b, epochs=15)

    ewc_model = copy.deepcopy(model)
    ewc = EWC(ewc_model, strength=400.0)
    ewc.consolidate(batches_of(task_a))
    ewc.attach()
    fit(ewc_model, task_b, epochs=15)

    replay = copy.deepcopy(model)
    buffer = RehearsalBuffer(capacity=64)
    buffer.add(list(zip(*task_a, strict=True)))
    mixed = buffer.mix(list(zip(*task_b, strict=True)))
    fit(replay, (torch.stack([x for x, _ in mixed]), torch.stack([y for _, y in mixed])), epochs=15)

    plain_a = accuracy(plain, task_a)
    assert learned > 0.9 and plain_a < learned - 0.3  # sequential fine-tuning forgets task A
    assert accuracy(ewc_model, task_a) > plain_a + 0.2
    assert accuracy(replay, task_a) > plain_a + 0.2
    for m in (plain, ewc_model, replay):  # and every variant learned task B
        assert accuracy(m, task_b) > 0.65


# ------------------------------------------------------------------------------ compare and demo


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory, minilm):
    """A tiny random BERT with MiniLM's tokenizer, and a folder of 40 texts in two easy classes."""
    import random
    import shutil

    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / "model" / name)
    rng = random.Random(0)
    words = {"sport": "goal match team win league", "tech": "chip software phone data cloud"}
    for label, vocab in words.items():
        (folder / "data" / label).mkdir(parents=True)
        for i in range(20):
            text = " ".join(rng.choice(vocab.split()) for _ in range(rng.randint(3, 12)))
            (folder / "data" / label / f"{i}.txt").write_text(text)
    return folder


def graft_cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)], capture_output=True, text=True, cwd=root
    )


@pytest.mark.slow
def test_compare_writes_a_table_and_a_plot_per_strategy(cli_assets, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {cli_assets / 'model'}}}\n"
        f"data: {{train: {cli_assets / 'data'}, val_fraction: 0.2, test_fraction: 0.2, max_length: 16}}\n"
        "task: {name: classification}\noptim: {lr: 1.0e-3}\n"
        f"train: {{output: {tmp_path / 'runs'}, max_steps: 2, batch_size: 4, plots: false}}\n"
        "eval: {metric: accuracy}\n"
    )
    result = graft_cli(
        "compare", recipe, "--strategies", "bitfit,lora:r=2,alpha=4", "--output", tmp_path / "cmp"
    )
    assert result.returncode == 0, result.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["strategy"] for r in rows] == ["bitfit", "lora:r=2,alpha=4"]
    for r in rows:
        assert 0 <= float(r["metric"]) <= 1 and 0 < int(r["trainable"]) < int(r["total"])
        assert float(r["peak_mb"]) > 0 and float(r["wall_s"]) > 0 and float(r["checkpoint_mb"]) > 0
    assert "| lora:r=2,alpha=4 |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    bad = graft_cli("compare", recipe, "--strategies", "full,lroa")
    assert bad.returncode == 1 and "did you mean 'lora'" in bad.stderr


@pytest.mark.slow
def test_demo_trains_reports_and_saves_a_model_transformers_loads(cli_assets, tmp_path):
    out = tmp_path / "demo"
    result = graft_cli("demo", "--model", cli_assets / "model", "--data", cli_assets / "data", "--output", out,
                       "--steps", "3", "--batch-size", "4", "--max-length", "16", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    # the strategy's parameter report is a log line (stderr); the results are on stdout
    assert "parameters trainable" in result.stderr and "test accuracy" in result.stdout
    assert "predictions:" in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert merged.config.num_labels == 2


@pytest.mark.parametrize("spec", [s for s in TABLE if not s.startswith("freeze:layers")])
def test_strategy_checkpoint_and_base_model_reload_to_the_same_predictions(spec, bert, tmp_path):
    from graft.loading import load_trained
    from graft.strategies import save_trained

    model = apply_strategy(task_model("bert", bert), spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch()).loss.backward()
        optimizer.step()
    save_trained(model, tmp_path / "trained")
    again = load_trained(bert, tmp_path / "trained")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, again(**batch()).logits)
