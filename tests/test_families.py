"""Every family in the registry matches its transformers reference, loads and saves in HF layout."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import hf_model, padded_batch, tiny_hf_config

from graft.generation import greedy
from graft.loading import load_model, save_model
from graft.models import FAMILIES
from graft.nn import Transformer
from graft.tasks import TaskModel

TOL = 1e-5


def test_every_family_has_a_tiny_reference():
    for name in FAMILIES:
        tiny_hf_config(name)


# one stack over tokens each; images: test_vit; the encoder-decoders (two stacks): test_seq2seq_families.py
@pytest.fixture(
    params=sorted(n for n, f in FAMILIES.items() if f.inputs == "tokens" and not f.encoder_decoder)
)
def family(request) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["reference", "kernels"])
def kernels(request) -> bool:
    """Every parity test runs on graft.nn's reference code and on graft's kernels."""
    return request.param


def max_diff_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def test_last_hidden_state_matches_transformers(family, tmp_path, kernels):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=kernels)
    assert isinstance(model, Transformer) and model.config.family == family
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, mask).last_hidden_state
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    assert max_diff_on_real_tokens(expected, got, mask) <= TOL


def test_all_hidden_states_match(family, tmp_path, kernels):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=kernels)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = model(ids, mask, output_hidden_states=True).hidden_states
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert max_diff_on_real_tokens(e, g, mask) <= TOL


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_attention_probabilities_match_transformers(family, padding_side, tmp_path, kernels):
    """output_attentions: one (B, nh, T, S) tensor per layer, rows summing to 1, nothing on padded
    keys (nor on future ones in a decoder), equal to transformers' eager attention on real queries."""
    hf_model(family).save_pretrained(tmp_path)
    eager = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = load_model(tmp_path, task="base", kernels=kernels)
    ids, mask = padded_batch(padding_side)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        out = model(ids, mask, output_attentions=True)
        assert model(ids, mask).attentions is None  # computed only when asked for
    got = out.attentions
    assert len(got) == len(expected) == model.config.num_layers
    real = mask.bool()  # (B, T): real queries, and real keys
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)  # (T, S)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape == (3, model.config.num_heads, 9, 9)
        assert (g.sum(-1) - 1).abs().max() <= 1e-6
        padded_keys = (real[:, None, :, None] & ~real[:, None, None, :]).expand_as(g)  # of real queries
        assert torch.all(g[padded_keys] == 0)
        if model.config.causal:
            assert torch.all(g[..., future] == 0)
        assert (g.transpose(1, 2)[real] - e.transpose(1, 2)[real]).abs().max() <= TOL  # real queries


def test_graft_output_loads_in_transformers(family, tmp_path, kernels):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "ref")
    model = load_model(tmp_path / "ref", task="base", kernels=kernels)
    save_model(model, tmp_path / "graft")
    again = transformers.AutoModel.from_pretrained(tmp_path / "graft", attn_implementation="sdpa").eval()
    assert type(again) is type(ref)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        got = again(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_real_tokens(expected, got, mask) <= TOL
    # and graft reads its own output back bit for bit
    for a, b in zip(
        model.state_dict().values(),
        load_model(tmp_path / "graft", task="base", kernels=kernels).state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_parameter_count_equals_transformers(family, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())


def test_pytorch_bin_and_sharded_safetensors_load(family, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    ref.config.save_pretrained(tmp_path / "bin")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    a, b = load_model(tmp_path / "sharded", task="base"), load_model(tmp_path / "bin", task="base")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


DECODERS = sorted(name for name, f in FAMILIES.items() if f.decoder)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_logits_match(decoder, padding_side, tmp_path, kernels):
    ref = hf_model(decoder, "causal-lm")
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    assert isinstance(model, TaskModel) and model.task == "causal-lm"
    ids, mask = padded_batch(padding_side)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    assert max_diff_on_real_tokens(expected, got, mask) <= TOL


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_generation_matches_transformers(decoder, tmp_path, kernels):
    ref = hf_model(decoder, "causal-lm")
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    ids, mask = padded_batch("left")
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = greedy(model, ids, mask, max_new_tokens=24, eos_token_id=ref.config.eos_token_id, pad_token_id=0)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("decoder", DECODERS)
def test_causal_lm_saves_for_transformers(decoder, tmp_path, kernels):
    ref = hf_model(decoder, "causal-lm")
    ref.save_pretrained(tmp_path / "ref")
    model = load_model(tmp_path / "ref", kernels=kernels)
    save_model(model, tmp_path / "graft")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "graft").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        assert (
            again(input_ids=ids, attention_mask=mask).logits
            - model(input_ids=ids, attention_mask=mask).logits
        )[mask.bool()].abs().max() <= TOL


def test_kv_cache_decoding_equals_full_forward(tmp_path, kernels):
    ref = hf_model("gpt2", "causal-lm")
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=kernels)
    ids = torch.randint(3, 99, (2, 12))
    from graft.nn import KVCache

    cache = KVCache(model.config.num_blocks)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        steps = [model(input_ids=ids[:, :5], cache=cache).logits]
        steps += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rows_give_the_same_outputs_and_gradients_as_the_full_stack(family, padding_side, tmp_path, kernels):
    """Asking for a few positions (what a classifier reads) changes the work, not the numbers."""
    hf_model(family).save_pretrained(tmp_path)
    model = load_model(tmp_path, task="base", kernels=kernels)
    ids, mask = padded_batch(padding_side)
    rows = torch.tensor([[0, 8], [5, 1], [7, 8]])  # (B, K), any positions, repeats allowed
    full = model(ids, mask)
    wanted = full.last_hidden_state.gather(
        1, rows[..., None].expand(-1, -1, full.last_hidden_state.shape[-1])
    )
    part = model(ids, mask, rows=rows)
    assert part.last_hidden_state.shape == (3, 2, model.config.hidden_size)
    assert torch.equal(part.rows, rows)
    assert (part.last_hidden_state - wanted).abs().max() <= 1e-6
    grads = []
    for out in (wanted, part.last_hidden_state):
        model.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max() <= 1e-6 * max(1.0, g.abs().max().item()), name


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss_and_gradients(tmp_path):
    """graft's own CPU kernels step aside under torch.compile (`train.compile: true`)."""
    hf_model("bert").save_pretrained(tmp_path)
    model = load_model(tmp_path, task="classification", id2label=["a", "b"]).eval()  # no dropout
    ids, mask = padded_batch()
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0]))
    results = []
    for compiled in (False, True):
        if compiled:
            model.compile()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (comp, comp_grads) = results
    assert abs(eager.item() - comp.item()) <= 1e-5
    for name, g in eager_grads.items():
        assert (g - comp_grads[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), name


def test_loading_a_model_imports_no_part_of_the_compiler(tmp_path):
    """A model's shapes are checked on the meta device before anything is allocated, and torch's meta
    ``normal_``, ``randn``, ``pow`` and ``exp`` import torch._dynamo (1 s per process) on their first
    call: graft's modules draw and compute nothing there (graft.nn.init), so a process that loads
    a model of any family to run it, a CLI command, a server, imports no part of torch.compile."""
    import subprocess
    import sys

    folders = []
    for name in sorted(FAMILIES):
        hf_model(name).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    script = (
        "import sys\nfrom graft.loading import load_model\n"
        "for folder in sys.argv[1:]:\n"
        "    load_model(folder)\n"
        "    assert 'torch._dynamo' not in sys.modules, folder\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.splitlines()[-1:]
