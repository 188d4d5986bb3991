"""graft's CPU kernels against the plain computation they replace, and the switch between them."""

from __future__ import annotations

import contextlib
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from graft.models import FAMILIES
from graft.nn import TransformerConfig


def test_dropout_drops_at_the_rate_and_keeps_the_mean():
    from graft.kernels.dropout import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # 1e6 draws: the standard error is 3e-4
    assert abs(y.mean().item() - 1.0) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(65536 / (65536 - 6554)))  # 0.1 rounds to 6554 / 65536
    y.sum().backward()  # the gradient flows exactly where the value was kept
    assert torch.equal(x.grad == 0, y == 0)
    assert torch.equal(x.grad[y != 0], y[y != 0])
    drop.eval()
    assert drop(x) is x


def test_dropout_masks_follow_torch_seed_and_rng_state():
    from graft.kernels.dropout import dropout

    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    state = torch.get_rng_state()
    b = dropout(x, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.5), b)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_dropout_backward_redraws_the_forward_mask_without_touching_the_generator():
    """Backward multiplies the gradient by the very mask forward drew (drawn again from the
    saved generator state, not kept), and leaves torch's global generator where forward left it."""
    from graft.kernels.dropout import dropout

    torch.manual_seed(5)  # x: no zeros, so y == 0 exactly where dropped
    x = (torch.rand(4, 33, 17) + 0.5).requires_grad_()
    y = dropout(x, 0.3)
    after_forward = torch.get_rng_state()
    torch.rand(1000)  # other draws between forward and backward do not change the mask
    moved = torch.get_rng_state()
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(torch.get_rng_state(), moved)
    assert not torch.equal(after_forward, moved)
    kept = y != 0
    assert 0 < int(kept.sum()) < kept.numel()
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.equal(grad, kept.float() * scale)  # the kept scale where kept, 0 elsewhere


@pytest.mark.parametrize("masked", [False, True])
def test_attention_math_path_with_dropout_equals_sdpa_without(masked):
    """With every element kept, graft's CPU dropout path computes torch's attention."""
    from graft.kernels.attention import attend

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True
    )
    got = attend(q, k, v, mask, False, 1e-9, 0.3)  # rounds to a rate of 0: nothing dropped
    assert (got - expected).abs().max() <= 1e-6
    causal = attend(q, k[:, :, :5], v[:, :, :5], None, True, 1e-9, 0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :5], v[:, :, :5], is_causal=True, scale=0.3, enable_gqa=True
    )
    assert (causal - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias", "causal"])
def test_dropped_attention_gives_the_unfused_values_and_gradients(mask_kind):
    """The CPU attention-dropout function (keeps probabilities and mask, not the dropped
    probabilities) equals dropout(softmax(q k^T * scale + mask)) v with the same mask, in
    values and in the gradients of q, k and v (grouped-query heads included)."""
    from graft.kernels.attention import attend
    from graft.kernels.dropout import keep_mask

    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 8, requires_grad=True), torch.randn(2, 2, 6, 8, requires_grad=True)
    mask = {
        "none": None,
        "bool": torch.rand(2, 1, 6, 6) > 0.3,
        "bias": torch.randn(2, 1, 1, 6),
        "causal": None,
    }[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True
    seed, grad = 11, torch.randn(2, 4, 6, 8)
    torch.manual_seed(seed)
    got = attend(q, k, v, mask, mask_kind == "causal", 0.3, 0.35)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)

    torch.manual_seed(seed)
    keep, kept_scale = keep_mask(torch.Size((2, 4, 6, 6)), 0.3, q.device)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-2, -1)) * 0.35
    if mask_kind == "bool":
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask_kind == "bias":
        scores = scores + mask
    elif mask_kind == "causal":
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    expected = (scores.softmax(-1) * keep * kept_scale) @ vv
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert 0 < int((keep == 0).sum()) < keep.numel()  # some dropped, some kept
    assert (got - expected).abs().max() <= 1e-6
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_training_gelu_gives_torch_values_and_gradients(activation):
    """A linear layer with GELU in training (GELU's backward writing over its incoming gradient)
    gives torch's values and gradients for its input, weight and bias."""
    from graft.kernels.linear import linear

    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 8, requires_grad=True), torch.randn(16, 8), torch.randn(16)
    w.requires_grad_(), b.requires_grad_()
    down = torch.randn(4, 16)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    got = F.linear(linear(x, w, b, activation), down)
    got_grads = torch.autograd.grad(got.square().sum(), (x, w, b))
    expected = F.linear(F.gelu(F.linear(x, w, b), approximate=approximate), down)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, w, b))
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("needs", ["all", "frozen weight", "frozen input"])
def test_training_linear_equals_torch_linear(needs):
    """graft's fp32 CPU training linear (oneDNN forward) gives torch's values and gradients."""
    from graft.kernels.linear import linear

    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, requires_grad=needs != "frozen input")
    w = torch.randn(24, 16, requires_grad=needs != "frozen weight")
    b = torch.randn(24, requires_grad=True)
    g = torch.randn(3, 7, 24)
    grads = []
    for fn in (torch.nn.functional.linear, linear):
        y = fn(x, w, b)
        y.backward(g)
        grads.append((y.detach(), *(t.grad.clone() if t.grad is not None else None for t in (x, w, b))))
        for t in (x, w, b):
            t.grad = None
    for ref, got in zip(*grads, strict=True):
        assert (ref is None) == (got is None)
        if ref is not None:
            assert (ref - got).abs().max() <= 1e-5


def test_packed_weights_are_kept_until_a_weight_changes():
    from graft.kernels import Kernels
    from graft.kernels.linear import linear

    layer = torch.nn.Linear(16, 8)
    kernels = Kernels()
    store = kernels.store(layer)
    x = torch.randn(2, 16)
    with torch.no_grad(), kernels.frozen(store):
        packed = linear(x, layer.weight, layer.bias, key=layer, packed=kernels.packed())
    assert (packed - layer(x)).abs().max() <= 1e-5 and len(store) == 1
    assert kernels.packed() is None  # frozen only inside
    assert kernels.store(layer) is store  # the next call reuses the packed weights
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step, say
    fresh = kernels.store(layer)
    assert fresh is not store and not fresh
    with torch.no_grad(), kernels.frozen(fresh):
        got = linear(x, layer.weight, layer.bias, key=layer, packed=kernels.packed())
    assert (got - layer(x)).abs().max() <= 1e-5


def test_rotating_fused_queries_and_keys_together_equals_one_by_one():
    from graft.kernels.attention import FastAttention
    from graft.nn.positions import Rotary, apply_rotary

    cfg = TransformerConfig(
        family="llama",
        vocab_size=10,
        hidden_size=32,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        position="rotary",
    )
    attn = FastAttention(cfg, 0)
    rotary = Rotary(cfg)(torch.arange(5).expand(2, -1), torch.float32)  # (2, 1, 5, 8) each
    y = torch.randn(2, 5, 32 + 16 + 16)  # a fused Q/K/V projection
    q, k, _ = y.split([32, 16, 16], -1)
    with torch.no_grad():
        got_q, got_k = attn.rotate(q, k, rotary)
    cos, sin = (t.transpose(1, 2) for t in rotary)
    assert torch.equal(got_q, apply_rotary(q.unflatten(-1, (4, 8)), cos, sin).flatten(-2))
    assert torch.equal(got_k, apply_rotary(k.unflatten(-1, (2, 8)), cos, sin).flatten(-2))
    assert got_q.data_ptr() + 32 * 4 == got_k.data_ptr()  # they were rotated as one tensor


# ---- the switch ------------------------------------------------------------------------------


@pytest.fixture
def tiny_llama(tmp_path):
    from conftest import hf_model

    hf_model("llama", "causal-lm").save_pretrained(tmp_path)
    return tmp_path


def test_optimize_and_reference_swap_the_forward_only(tiny_llama):
    """The switch keeps every parameter, name and number; only which code runs changes."""
    import copy

    from graft import kernels
    from graft.kernels.attention import FastAttention
    from graft.loading import load_model
    from graft.nn import Attention

    model = load_model(tiny_llama, kernels=False)
    assert not kernels.enabled(model) and type(model.body.layers[0].attn) is Attention
    names = list(model.state_dict())
    ids = torch.randint(3, 99, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        kernels.optimize(model)
        assert type(model.body.layers[0].attn) is FastAttention and kernels.enabled(model)
        assert list(model.state_dict()) == names
        assert (model(input_ids=ids).logits - expected).abs().max() <= 1e-5
        with kernels.frozen(model):  # packed weights, fused Q/K/V and gate/up
            assert (model(input_ids=ids).logits - expected).abs().max() <= 1e-5
        copied = copy.deepcopy(model)  # a copy has kernels of its own
        assert kernels.kernels_of(copied) is not kernels.kernels_of(model)
        assert (copied(input_ids=ids).logits - expected).abs().max() <= 1e-5
        kernels.reference(model)
        assert not kernels.enabled(model) and type(model.body.layers[0].attn) is Attention
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert kernels.report(copied)["fused q/k/v"] == "in 2 layers"


def test_a_strategy_applied_after_optimize_gets_its_kernels(tiny_llama):
    from graft import kernels
    from graft.kernels.dropout import Dropout
    from graft.loading import load_model
    from graft.strategies import apply_strategy

    model = load_model(tiny_llama)
    apply_strategy(model, "lora:dropout=0.1")
    assert type(model.body.layers[0].attn.q.lora_dropout) is Dropout  # graft's cheap masks
    # LoRA's wrapped projections are called as modules: Q/K/V cannot run as one matrix multiply
    assert (
        kernels.report(model)["fused q/k/v"]
        == "in 0 layers; 2 have wrapped or hooked projections (LoRA, adapters)"
    )


def test_one_model_serves_many_threads_with_the_serial_results(tiny_llama):
    """8 threads through one loaded model, half with frozen (packed) weights and half without,
    get exactly what each computes alone: nothing of one call's state leaks into another's."""
    from concurrent.futures import ThreadPoolExecutor

    from graft import kernels
    from graft.loading import load_model

    model = load_model(tiny_llama)
    batches = [torch.randint(3, 99, (2, 5 + i)) for i in range(8)]

    def run(i: int) -> torch.Tensor:
        with torch.inference_mode(), kernels.frozen(model) if i % 2 else contextlib.nullcontext():
            return model(input_ids=batches[i]).logits

    serial = [run(i) for i in range(8)]
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(run, range(8)))
        for a, b in zip(serial, parallel, strict=True):
            assert torch.equal(a, b)


def test_the_reference_model_has_no_kernel_code():
    """graft.nn is the plain model: it neither imports the kernels nor asks whether it is being
    compiled, and keeps no state at module level that a call could change."""
    import ast
    from pathlib import Path

    import graft.nn

    for path in Path(graft.nn.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("graft.kernels"), path
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("is_compiling", "_forward_hooks", "_forward_pre_hooks"), path
        assert not any(isinstance(node, ast.Global) for node in ast.walk(tree)), path  # nothing rebound


# ---- the routes: measured per CPU, taken per shape -------------------------------------------


def figures_where(winner: str):
    """A timing function saying ``winner`` is the fastest route for every shape (then the others
    in ROUTES order), in µs: the choice logic sees exactly these figures."""
    from graft.kernels.linear import ROUTES

    order = [winner, *(r for r in ROUTES if r != winner)]
    calls = []

    def measure(dtype, rows, out, inp, activation):
        calls.append((dtype, rows, out, inp, activation))
        return {route: (1 + order.index(route)) * 1e-6 for route in ROUTES}

    measure.calls = calls
    return measure


def onednn_ops(run) -> set[str]:
    """The oneDNN linear ops that ``run()`` called."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages() if e.key.startswith("mkldnn::")}


@pytest.mark.parametrize("winner", ["torch", "onednn", "packed"])
def test_each_path_takes_the_route_the_timings_say_is_faster_with_the_reference_outputs(tiny_llama, winner):
    """Decoding (frozen, 1 and 2 rows), batch inference and a training step take the measured
    fastest route among those each call allows (packed weights only while frozen), and give the
    reference's numbers."""
    from graft import kernels
    from graft.kernels import Calibration
    from graft.loading import load_model

    reference = load_model(tiny_llama, kernels=False)
    model = kernels.optimize(
        load_model(tiny_llama, kernels=False), Calibration(figures_where(winner), cache=False)
    )
    ids = torch.randint(3, 99, (2, 40))  # 80 rows: "many"
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    def frozen(rows: int):
        with torch.no_grad(), kernels.frozen(model):
            return model(input_ids=ids[:rows, :1]).logits  # (rows, 1, V): a decoding step's shape

    @torch.no_grad()
    def batch():
        return model(input_ids=ids).logits

    for run, allowed in [
        (lambda: frozen(1), {"packed", "onednn", "torch"}),
        (lambda: frozen(2), {"packed", "onednn", "torch"}),
        (lambda: batch(), {"onednn", "torch"}),
    ]:
        ops = onednn_ops(run)
        route = winner if winner in allowed else "onednn"
        assert ("mkldnn::_reorder_linear_weight" in ops) == (route == "packed")
        assert ("mkldnn::_linear_pointwise" in ops) == (route != "torch"), (route, ops)
    with torch.no_grad():
        assert (frozen(1) - expected[:1, :1]).abs().max() <= 1e-5
        assert (frozen(2) - expected[:2, :1]).abs().max() <= 1e-5
        assert (batch() - expected).abs().max() <= 1e-5
    # a training step: oneDNN forward (and torch's backward) only when measured faster
    ops = onednn_ops(lambda: model(input_ids=ids).logits.square().mean().backward())
    assert ("mkldnn::_linear_pointwise" in ops) == (winner != "torch")
    reference(input_ids=ids).logits.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-5, name


def test_the_model_s_shapes_are_timed_together_once_per_dtype_and_class_of_rows(tiny_llama):
    from graft import kernels
    from graft.kernels import Calibration
    from graft.kernels.switch import linear_shapes
    from graft.loading import load_model

    measure = figures_where("torch")
    model = kernels.optimize(load_model(tiny_llama, kernels=False), Calibration(measure, cache=False))
    shapes = linear_shapes(model)  # q, k, v, o, gate, up, down, the head; Q/K/V, K/V, gate/up
    assert {(32 + 16 + 16, 32, "none"), (37 + 37, 32, "none"), (99, 32, "none")} <= shapes
    with torch.no_grad():
        model(input_ids=torch.randint(3, 99, (1, 40)))  # 40 rows
        model(input_ids=torch.randint(3, 99, (2, 50)))  # the same class: nothing new to time
        assert sorted(measure.calls) == sorted((torch.float32, 256, *s) for s in shapes)
        with kernels.frozen(model):
            model(input_ids=torch.randint(3, 99, (1, 1)))
    assert len(measure.calls) == 2 * len(shapes)
    assert {c[1] for c in measure.calls} == {256, 1}


def test_f_linear_is_taken_unless_another_route_is_clearly_faster():
    from graft.kernels.calibrate import MARGIN, fastest

    close = {"packed": 0.97, "onednn": 0.99, "torch": 1.0}
    assert fastest(close, ("packed", "onednn", "torch")) == "torch"  # within the noise: the plain path
    clear = {"packed": 0.9, "onednn": 0.99, "torch": 1.0}
    assert fastest(clear, ("packed", "onednn", "torch")) == "packed"
    assert fastest(clear, ("onednn", "torch")) == "torch"
    assert (
        fastest({"packed": 3.0, "onednn": 1 - 2 * MARGIN, "torch": 1.0}, ("packed", "onednn", "torch"))
        == "onednn"
    )


def test_cpus_of_one_model_name_and_other_instruction_sets_keep_their_timings_apart(tmp_path, monkeypatch):
    """An "AMD EPYC" under KVM may be a Zen 3 (AVX2) or a Zen 4 (AVX-512): one file each."""
    from graft.kernels import calibrate

    monkeypatch.setattr(calibrate, "processor", lambda: "AMD EPYC")
    monkeypatch.setattr(calibrate, "cpu_flags", lambda: "fpu sse avx avx2 fma")
    avx2 = calibrate.Calibration(figures_where("packed"), cache=tmp_path).path()
    monkeypatch.setattr(calibrate, "cpu_flags", lambda: "fpu sse avx avx2 fma avx512f avx512bw")
    avx512 = calibrate.Calibration(figures_where("packed"), cache=tmp_path).path()
    assert avx2 != avx512 and "AMD-EPYC" in avx2.name and "AMD-EPYC" in avx512.name


def test_timings_are_kept_per_processor_in_a_file_and_read_back(tmp_path, monkeypatch):
    from graft.kernels import calibrate

    monkeypatch.setattr(calibrate, "busy", lambda: "")  # a quiet machine: the figures are kept
    first = calibrate.Calibration(figures_where("packed"), cache=tmp_path)
    first.expect([(24, 16, "none"), (16, 24, "gelu")])
    assert first.route(torch.float32, 1, 24, 16, "none", ("packed", "onednn", "torch")) == "packed"
    path = first.path()
    assert path.parent == tmp_path and calibrate.processor().split()[0] in path.name
    saved = json.loads(path.read_text())
    assert saved["identity"] == first.identity()
    assert sorted(saved["timings"]) == ["float32 16x24 gelu one", "float32 24x16 none one"]

    def no_measuring(*args):
        raise AssertionError("timed again")

    again = calibrate.Calibration(no_measuring, cache=tmp_path)  # another process, the same CPU
    assert again.route(torch.float32, 1, 16, 24, "gelu", ("onednn", "torch")) == "onednn"
    assert again.explain(torch.float32, 1, 24, 16, "none", ("packed", "onednn", "torch")) == (
        "oneDNN packed (oneDNN packed 1.0 µs, oneDNN 2.0 µs, F.linear 3.0 µs)"
    )


def test_timings_of_a_busy_machine_are_marked_and_kept(tmp_path, monkeypatch):
    """Figures timed under load are marked, and kept: every process of the machine, a resumed
    training run among them, takes the same routes (and so computes the same numbers)."""
    from graft.kernels import calibrate

    shape = (torch.float32, 1, 24, 16, "none", ("packed", "onednn", "torch"))
    monkeypatch.setattr(calibrate, "busy", lambda: "load 5.0 on 2 CPUs")
    busy = calibrate.Calibration(figures_where("torch"), cache=tmp_path)
    assert busy.route(*shape) == "torch"
    saved = json.loads(busy.path().read_text())["timings"]
    assert saved == {"float32 24x16 none one": {"packed": 2e-6, "onednn": 3e-6, "torch": 1e-6, "busy": True}}
    measure = figures_where("packed")
    monkeypatch.setattr(calibrate, "busy", lambda: "")
    quiet = calibrate.Calibration(measure, cache=tmp_path)  # a later process, on a quiet machine
    assert quiet.route(*shape) == "torch" and measure.calls == []
    assert json.loads(quiet.path().read_text())["timings"] == saved


@pytest.mark.parametrize(
    "damage",
    ["not json", "other identity", "bad figures", "bad attention figures", "a folder", "under a file"],
)
def test_a_bad_or_unwritable_timings_file_is_ignored_with_one_log_line(tmp_path, monkeypatch, caplog, damage):
    from graft.kernels import calibrate

    monkeypatch.setattr(calibrate, "busy", lambda: "")
    folder = tmp_path / "file" if damage == "under a file" else tmp_path
    calibration = calibrate.Calibration(figures_where("onednn"), cache=folder)
    path = calibration.path()
    if damage == "a folder":  # cannot be read nor replaced
        (path / "inside").mkdir(parents=True)
    elif damage == "under a file":
        folder.write_text("")
    else:
        identity = calibration.identity() if damage != "other identity" else "another CPU"
        timings = {"float32 8x8 none one": {"packed": -1}} if damage == "bad figures" else {}
        attention = {"attention float32 b1 h2 q8 k8 d4 none": {"sdpa": "fast"}}
        attention = attention if damage == "bad attention figures" else {}
        data = {"identity": identity, "timings": timings, "attention": attention}
        path.write_text("{" if damage == "not json" else json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="graft"):
        for rows in (1, 1, 8):
            assert calibration.route(torch.float32, rows, 8, 8, "none", ("onednn", "torch")) == "onednn"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"kernels: {path}"), lines
    if damage not in ("a folder", "under a file"):  # written afresh
        assert json.loads(path.read_text())["identity"] == calibration.identity()


def test_the_environment_forces_a_route_without_timing(monkeypatch, tiny_llama):
    from graft import kernels
    from graft.errors import GraftError
    from graft.kernels import Calibration
    from graft.loading import load_model

    def no_measuring(*args):
        raise AssertionError("timed")

    monkeypatch.setenv("GRAFT_KERNEL_ROUTE", "torch")
    model = kernels.optimize(load_model(tiny_llama, kernels=False), Calibration(no_measuring))
    with torch.no_grad(), kernels.frozen(model):
        assert onednn_ops(lambda: model(input_ids=torch.randint(3, 99, (2, 3)))) == set()
    assert (
        "F.linear (forced to torch, not measured)"
        in kernels.report(model)["fused q/k/v and gate/up (float32, frozen)"]
    )
    monkeypatch.setenv("GRAFT_KERNEL_ROUTE", "onedn")
    with pytest.raises(GraftError) as e:
        Calibration()
    assert str(e.value) == (
        "GRAFT_KERNEL_ROUTE=onedn: not a route; use one of measure, packed, onednn, torch; did you mean 'onednn'?"
    )


def test_report_names_each_path_s_route_and_the_figures(tiny_llama):
    from graft import kernels
    from graft.kernels import Calibration
    from graft.loading import load_model

    model = kernels.optimize(
        load_model(tiny_llama, kernels=False), Calibration(figures_where("onednn"), cache=False)
    )
    report = kernels.report(model)
    why = "(oneDNN packed 2.0 µs, oneDNN 1.0 µs, F.linear 3.0 µs)"
    assert f"1 row: 16x32 oneDNN {why}" in report["frozen linears (float32: decoding, embedding)"]
    assert f"64x32 oneDNN {why}" in report["fused q/k/v and gate/up (float32, frozen)"].split("; ")[1]
    assert report["training linear (float32)"].startswith(
        "256 rows: 16x32 oneDNN (oneDNN 1.0 µs, F.linear 3.0 µs)"
    )
    plain = kernels.report(kernels.reference(model))  # the reference: no routes
    assert sorted(plain) == ["attention", "dropout", "fused q/k/v", "linear"]
    assert plain["linear"] == "torch's F.linear (the reference)"


def test_measuring_the_routes_times_each_of_them():
    from graft.kernels.calibrate import time_routes
    from graft.kernels.linear import ROUTES

    for rows in (1, 300):
        figures = time_routes(torch.float32, rows, 24, 16, "gelu")
        assert sorted(figures) == sorted(ROUTES) and all(0 < s < 1 for s in figures.values())


# ---- short attention: SDPA or matmul-softmax-matmul, whichever this CPU runs faster ----------


def attention_where(winner: str):
    """An attention timing function saying ``winner`` ("sdpa" or "matmul") is faster for every
    shape: 1 µs against 2 µs."""
    calls = []

    def measure(dtype, batch, heads, queries, keys, head_dim, masking):
        calls.append((dtype, batch, heads, queries, keys, head_dim, masking))
        return {"sdpa": 2e-6, "matmul": 2e-6, winner: 1e-6}

    measure.calls = calls
    return measure


def sdpa_called(run) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return any(e.key == "aten::scaled_dot_product_attention" for e in prof.key_averages())


@pytest.mark.parametrize("masking", ["none", "bool", "bias", "causal", "keys of a cache", "an empty row"])
def test_matmul_attention_equals_sdpa(masking):
    from graft.kernels.attention import matmul_attention

    torch.manual_seed(0)
    T, S = (3, 11) if masking == "keys of a cache" else (9, 9)
    q = torch.randn(2, T, 4, 8).transpose(1, 2)  # (B, nh, T, hd), strided as the model's
    k, v = (torch.randn(2, S, 4, 8).transpose(1, 2) for _ in range(2))  # (B, nh, S, hd)
    mask = {
        "bool": torch.tensor([[True] * S, [True] * 4 + [False] * (S - 4)])[:, None, None, :],  # (B, 1, 1, S)
        "bias": torch.randn(1, 4, T, S),
        "keys of a cache": torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None],  # (1, 1, T, S)
        "an empty row": torch.tensor([[True] * S, [False] * S])[:, None, None, :],  # text 2: all padding
    }.get(masking)
    causal = masking == "causal"
    expected = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=0.3)
    got = matmul_attention(q, k, v, mask, causal, 0.3)
    assert got.shape == expected.shape == (2, 4, T, 8)
    assert (got - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_the_reference_outputs_on_either_attention_route(family, tmp_path):
    """Short inputs (9 tokens, 9 patches, 12 frames) through SDPA or through matmul-softmax-matmul,
    whichever the timings say is faster, give the reference model's outputs (SDPA) at 1e-5 (of
    the largest output, where that is above 1). Only
    grouped-query attention over many queries stays on SDPA (its decoding steps do not)."""
    from conftest import stack_families
    from test_quantize import family_folder, outputs, two_stack_folder, two_stack_outputs

    from graft import kernels
    from graft.kernels import Calibration
    from graft.loading import load_model
    from graft.nn import Attention, KVCache

    if family in stack_families()[0]:
        task, folder = family_folder(family, tmp_path)
        run = lambda model: outputs(model, task, family)  # noqa: E731
    else:
        folder = two_stack_folder(family, tmp_path)
        run = lambda model: two_stack_outputs(model, family)  # noqa: E731
    reference = load_model(folder, kernels=False)
    expected = run(reference)
    tol = 1e-5 * expected.abs().max().clamp_min(
        1
    )  # float32 rounding grows with the values (mT5's logits: 17)
    grouped = any(m.num_kv_heads != m.num_heads for m in reference.modules() if isinstance(m, Attention))

    def check(winner: str) -> None:
        measure = attention_where(winner)
        model = load_model(folder, kernels=False)
        kernels.optimize(model, Calibration(figures_where("torch"), attention=measure, cache=False))
        assert (run(model) - expected).abs().max() <= tol, winner
        assert measure.calls or grouped  # timed at the first call of each class of shapes
        assert sdpa_called(lambda: run(model)) == (winner == "sdpa" or grouped), winner
        if not FAMILIES[family].decoder:
            return
        # a prompt, then one token at a time from the cache: grouped-query heads too, per step
        ids = torch.randint(3, 99, (2, 8))
        caches = KVCache(reference.config.num_blocks), KVCache(model.config.num_blocks)
        with torch.inference_mode():
            for step in (ids[:, :6], ids[:, 6:7], ids[:, 7:]):
                expected_step = reference(input_ids=step, cache=caches[0]).logits
                got = []
                took_sdpa = sdpa_called(lambda: got.append(model(input_ids=step, cache=caches[1]).logits))  # noqa: B023
                assert (got[0] - expected_step).abs().max() <= 1e-5 * expected_step.abs().max().clamp_min(1)
        assert took_sdpa == (winner == "sdpa"), winner

    check("sdpa")
    check("matmul")


def test_attention_is_timed_once_per_class_of_shapes_and_kept_in_the_file(tmp_path, monkeypatch):
    from graft.kernels import calibrate

    monkeypatch.setattr(calibrate, "busy", lambda: "")
    measure = attention_where("matmul")
    first = calibrate.Calibration(figures_where("torch"), cache=tmp_path, attention=measure)
    # 20 texts of 17 tokens: timed as 32 texts of 24; 30 texts of 23 tokens: the same class
    assert first.attention(torch.float32, 20, 12, 17, 17, 32, "bool") == "matmul"
    assert first.attention(torch.float32, 30, 12, 23, 23, 32, "bool") == "matmul"
    assert measure.calls == [(torch.float32, 32, 12, 24, 24, 32, "bool")]
    assert first.attention(torch.float32, 1, 12, 1, 40, 32, "none") == "matmul"  # batch 1, decoding
    assert measure.calls[1] == (torch.float32, 1, 12, 1, 48, 32, "none")
    # longer than LENGTHS: SDPA, not timed
    assert first.attention(torch.float32, 32, 12, 129, 129, 32, "bool") == "sdpa"
    assert len(measure.calls) == 2
    saved = json.loads(first.path().read_text())
    assert sorted(saved["attention"]) == [
        "attention float32 b1 h12 q1 k48 d32 none",
        "attention float32 b32 h12 q24 k24 d32 bool",
    ]
    assert saved["attention"]["attention float32 b1 h12 q1 k48 d32 none"] == {"sdpa": 2e-6, "matmul": 1e-6}

    def no_measuring(*args):
        raise AssertionError("timed again")

    again = calibrate.Calibration(no_measuring, cache=tmp_path, attention=no_measuring)  # another process
    assert again.attention(torch.float32, 32, 12, 24, 24, 32, "bool") == "matmul"
    assert again.explain_attention(torch.float32).endswith(
        "; b32 h12 q24 k24 d32 bool: matmul-softmax-matmul (SDPA 2.0 µs, matmul-softmax-matmul 1.0 µs)"
    )
    forced = calibrate.Calibration(no_measuring, force="packed", cache=False, attention=no_measuring)
    assert forced.attention(torch.float32, 32, 12, 24, 24, 32, "bool") == "sdpa"  # forced: nothing timed
    assert forced.explain_attention(torch.float32) == "SDPA (forced to packed, not measured)"


def test_sdpa_is_kept_unless_matmuls_are_clearly_faster():
    from graft.kernels.calibrate import ATTENTION, MARGIN, fastest

    assert fastest({"sdpa": 1.0, "matmul": 0.97}, ATTENTION, "sdpa") == "sdpa"  # within the noise
    assert fastest({"sdpa": 1.0, "matmul": 1 - 2 * MARGIN}, ATTENTION, "sdpa") == "matmul"


def test_training_dropout_and_gradients_keep_attention_s_own_paths(tmp_path):
    """Only inference (no gradient, no dropout) asks the attention timings: a training step and a
    forward with gradients (attributions) keep SDPA or graft's dropped attention."""
    from conftest import hf_model

    from graft import kernels
    from graft.kernels import Calibration
    from graft.loading import load_model

    hf_model("bert").save_pretrained(tmp_path / "bert")
    measure = attention_where("matmul")
    model = load_model(tmp_path / "bert", task="base", kernels=False)
    kernels.optimize(model, Calibration(figures_where("torch"), attention=measure, cache=False))
    ids, mask = torch.randint(3, 99, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    model.eval()(ids, mask).last_hidden_state.sum().backward()  # gradients: SDPA
    model.train()(ids, mask).last_hidden_state.sum().backward()  # dropout: graft's own
    assert measure.calls == []
    with torch.no_grad():
        model.eval()(ids, mask)
    assert len(measure.calls) == 1


def test_measuring_attention_times_both_ways():
    from graft.kernels.calibrate import ATTENTION, MASKINGS, time_attention

    for masking in MASKINGS:
        figures = time_attention(torch.float32, 2, 3, 8, 8, 16, masking)
        assert sorted(figures) == sorted(ATTENTION) and all(0 < s < 1 for s in figures.values())


# ---- the switch at the boundaries: recipes and the command line -------------------------------


def test_a_recipe_with_kernels_off_trains_the_reference_model(tmp_path, minilm):
    import csv
    import shutil

    import transformers

    from graft import kernels
    from graft.train.build import build_trainer
    from graft.train.config import Recipe, build
    from graft.train.loggers import read_metrics

    folder = tmp_path / "model"
    transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
    ).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *((f"text number {i}", "ab"[i % 2]) for i in range(12))])
    recipes = {}
    for switch in (True, False):
        recipes[switch] = build(
            Recipe,
            {
                "model": {"path": str(folder), "kernels": switch},
                "data": {"train": str(tmp_path / "train.csv")},
                "train": {
                    "output": str(tmp_path / f"run-{switch}"),
                    "max_steps": 2,
                    "batch_size": 4,
                    "plots": False,
                },
            },
            "test",
        )
    trainers = {switch: build_trainer(recipe, quiet=True) for switch, recipe in recipes.items()}
    assert kernels.enabled(trainers[True].module) and not kernels.enabled(trainers[False].module)
    result = trainers[False].fit()  # (dropout draws other masks with the kernels: no parity to test)
    losses = [line["loss"] for line in read_metrics(tmp_path / "run-False") if "loss" in line]
    assert result["steps"] == 2 and losses and all(math.isfinite(x) for x in losses)
    assert not kernels.enabled(trainers[False].module)


def test_embed_reference_gives_the_default_vectors(minilm, cli):
    texts = ["A man is eating food.", "Transfer learning adapts a pretrained model to a new task."]
    args = ["embed", minilm, *(a for t in texts for a in ("--text", t))]
    default = [json.loads(line) for line in cli(*args).ok().stdout.splitlines()]
    reference = [json.loads(line) for line in cli(*args, "--reference").ok().stdout.splitlines()]
    assert (torch.tensor(default) - torch.tensor(reference)).abs().max() <= 1e-5


def test_compiled_decoding_needs_the_kernels_that_reference_turns_off(cli, tiny_llama):
    assert cli(
        "generate", tiny_llama, "-p", "hi", "--compile", "--dtype", "bfloat16", "--reference"
    ).error_line() == (
        "error: --compile runs on graft's kernels, which --reference turns off: drop one of them"
    )
