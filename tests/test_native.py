"""The C loops compiled at first use (graft.kernels.native) compute torch's bytes, and a machine
without them falls back with one log line; int8-dynamic's feed-forward in chunks of rows gives
the whole-batch numbers."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import hf_model, tiny_hf_config

from graft.compress.quantize import quantize
from graft.kernels import feedforward, native
from graft.kernels.feedforward import FastFeedForward
from graft.kernels.int8 import LEVELS, TINY, ZERO, activated_rows, quantize_rows, torch_quantize_rows
from graft.loading import load_model

needs_compiler = pytest.mark.skipif(shutil.which(native.compiler()) is None, reason="no C compiler")


def hard_rows() -> list[torch.Tensor]:
    """Rows a quantizer gets wrong first: an outlier, all zeros, all negative, one value, ties."""
    torch.manual_seed(0)
    x = torch.randn(64, 100)
    x[3, 7] = 300.0  # an outlier token
    x[5] = 0.0
    x[6] = -x[6].abs()
    x[7] = 0.0
    x[7, 99] = 1e-30  # under the smallest scale
    x[8] = torch.arange(100) - 49.5  # steps that land on .5 after scaling
    return [x, x[:1], x[:, :37], torch.randn(3, 1536) * 50, torch.randn(200, 16)]


@needs_compiler
def test_the_c_loop_is_built_where_a_compiler_is():
    assert native.library() is not None, "a C compiler is on PATH but the loops did not build (see the log)"
    assert native.library_path().exists()


@needs_compiler
@pytest.mark.parametrize("levels, zero", [(127, 128), (63, 64)], ids=["8-bit", "7-bit"])
@pytest.mark.parametrize("case", range(5))
def test_native_rows_are_torch_s_bytes(case, levels, zero):
    x = hard_rows()[case]
    got = native.quantize_rows(x.contiguous(), TINY, levels, zero)
    assert got is not None
    expected = torch_quantize_rows(x, levels, zero)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_compiler
def test_quantize_rows_takes_any_layout_and_dtype():
    x = torch.randn(40, 96)
    for variant in (x.t().contiguous().t(), x[:, ::2], x.bfloat16()):
        q, scale = quantize_rows(variant)
        expected = torch_quantize_rows(variant.float())
        assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1])


@needs_compiler
@pytest.mark.parametrize("activation", ["gelu", "relu", None])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_feed_forward_middle_is_torch_s_passes_in_one(activation, bias):
    """activation(acc * s + b) written over acc within 2e-6 of torch's (GELU's erf by a rational
    approximation), and its rows quantized exactly as quantize_rows quantizes them."""
    torch.manual_seed(0)
    acc, s = torch.randn(300, 1536) * 3, torch.rand(300, 1) + 0.5
    acc[4, 9] = 80.0  # an outlier: GELU's identity tail
    b = torch.randn(1536) if bias else None
    h = acc * s if b is None else torch.addcmul(b, acc, s)
    functions = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, None: lambda h: h}
    expected = functions[activation](h)
    written = acc.clone()
    got = native.activate_quantize_rows(written, s, b, activation, TINY, LEVELS, ZERO)
    assert got is not None
    assert (written - expected).abs().max() <= 2e-6 * max(1.0, float(expected.abs().max()) / 40)
    q, scale = quantize_rows(written)
    assert torch.equal(got[0], q) and torch.equal(got[1], scale)
    threads = torch.get_num_threads()  # rows split among threads: the same bytes
    try:
        torch.set_num_threads(1)
        one = native.activate_quantize_rows(acc.clone(), s, b, activation, TINY, LEVELS, ZERO)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], got[0]) and torch.equal(one[1], got[1])


def test_the_feed_forward_middle_declines_what_it_does_not_compute():
    acc, s = torch.randn(8, 64), torch.rand(8, 1)

    def middle(acc, s, bias, activation):
        return native.activate_quantize_rows(acc, s, bias, activation, TINY, LEVELS, ZERO)

    assert middle(acc, s, None, "silu") is None  # not one of the C loop's activations
    assert middle(acc.t(), s, None, "gelu") is None  # not row-major
    assert middle(acc, s[:4], None, "gelu") is None  # a scale short
    assert middle(acc, s, torch.zeros(63), "gelu") is None  # a bias short
    # what the C loop declines, torch's passes compute
    q, scale = activated_rows(acc.clone(), s, None, "silu")
    expected = quantize_rows(torch.nn.functional.silu(acc * s))
    assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1])


def int8_weight_and_rows(rows: int, out: int = 300, cols: int = 96):
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (out, cols), dtype=torch.int8)
    scale = torch.rand(out) / 100
    x = torch.randn(rows, cols)
    x[0, 5] = 200.0  # an outlier channel
    return x, weight, scale


@needs_compiler
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_weight_product_is_the_exact_one_within_fp32_sums(rows):
    """y = x @ (weight * scale)^T from the int8 weight read as it is: each output within the fp32
    rounding of its sum (K + 2 roundings of 2^-24 of the sum of |terms|) of the float64 product."""
    x, weight, scale = int8_weight_and_rows(rows)
    got = native.int8_weight_mm(x, weight, scale)
    assert got is not None and got.shape == (rows, 300) and got.dtype == torch.float32
    exact = (x.double() @ weight.double().t()) * scale.double()
    terms = (x.abs().double() @ weight.abs().double().t()) * scale.double()
    assert ((got.double() - exact).abs() <= (96 + 2) * 2.0**-24 * terms).all()


@needs_compiler
def test_int8_weight_product_is_the_same_on_any_number_of_threads():
    x, weight, scale = int8_weight_and_rows(3, out=2048)  # enough outputs to split among threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int8_weight_mm(x, weight, scale)
        torch.set_num_threads(2)
        two = native.int8_weight_mm(x, weight, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_int8_weight_product_declines_what_it_does_not_compute():
    x, weight, scale = int8_weight_and_rows(2)
    assert native.int8_weight_mm(x[:, :37], weight[:, :37].contiguous(), scale) is None  # not 32k wide
    assert native.int8_weight_mm(x.bfloat16(), weight, scale) is None
    assert native.int8_weight_mm(x, weight.float(), scale) is None
    assert native.int8_weight_mm(x, weight.t().contiguous().t(), scale) is None  # not row-major


def test_without_a_compiler_torch_s_ops_answer_with_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="graft"):
            assert native.library() is None
            x = torch.randn(4, 32)
            assert native.quantize_rows(x, TINY, 127, 128) is None
            assert native.int8_weight_mm(x, torch.zeros(3, 32, dtype=torch.int8), torch.ones(3)) is None
            q, scale = quantize_rows(x)
        assert torch.equal(q, torch_quantize_rows(x)[0])
        lines = [r.getMessage() for r in caplog.records if "C compiler" in r.getMessage()]
        assert len(lines) == 1 and "no-such-cc" in lines[0]
    finally:
        native.library.cache_clear()


def test_a_failed_build_is_one_log_line_and_leaves_no_library(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="graft"):
            assert native.library() is None
        assert any("did not build" in r.getMessage() for r in caplog.records)
        assert not list((tmp_path / "graft" / "kernels").glob("*.so"))
    finally:
        native.library.cache_clear()


def test_graft_native_0_turns_the_loops_off(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("family", ["bert", "llama"], ids=["gelu", "gated"])
def test_int8_feed_forward_in_chunks_of_rows_gives_the_whole_batch_numbers(family, tmp_path, monkeypatch):
    """Products accumulate exactly in int32 and every other pass is per row or per element: the
    chunks change nothing but where the rows are in memory."""
    hf_model(family).save_pretrained(tmp_path)
    model = quantize(load_model(tmp_path), "int8-dynamic")
    layer = next(m for m in model.modules() if isinstance(m, FastFeedForward))
    for linear in (layer.up, getattr(layer, "gate", None)):  # a decoder's on 7-bit rows stay float
        if linear is not None:
            linear.activations = "dynamic"
    x = torch.randn(4, 50, tiny_hf_config(family).hidden_size)
    with torch.inference_mode():
        whole = layer(x)
        assert layer.chunk_rows(x) is None  # 200 rows: one piece
        monkeypatch.setattr(feedforward, "CHUNK_BYTES", 1)  # the smallest chunks: 64 rows
        assert layer.chunk_rows(x) == 64
        chunked = layer(x)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() <= 1e-6 * whole.abs().max()


@pytest.mark.parametrize("family", ["bert", "distilbert"], ids=["bert", "distilbert-odd-width"])
def test_int8_feed_forward_middle_in_c_is_the_layer_by_layer_output(family, tmp_path, monkeypatch):
    """The fused middle (graft's C loop) against the same layer run layer by layer (up, torch's
    activation, down): within the int8 rows' rounding, a step of a few elements at most."""
    hf_model(family).save_pretrained(tmp_path)
    model = quantize(load_model(tmp_path), "int8-dynamic")
    layer = next(m for m in model.modules() if isinstance(m, FastFeedForward))
    x = torch.randn(4, 50, tiny_hf_config(family).hidden_size)
    with torch.inference_mode():
        assert layer.int8_rows(x)
        fused = layer(x)
        monkeypatch.setattr(FastFeedForward, "int8_rows", lambda self, x: False)
        separate = layer(x)
    assert fused.shape == separate.shape
    assert (fused - separate).abs().max() <= 0.02 * separate.abs().max()
    assert (fused - separate).abs().mean() <= 1e-3 * separate.abs().mean()


def test_float_feed_forwards_are_not_chunked(tmp_path):
    hf_model("bert").save_pretrained(tmp_path)
    for method in ("int8-weight", "bf16", None):
        model = load_model(tmp_path) if method is None else quantize(load_model(tmp_path), method)
        layer = next(m for m in model.modules() if isinstance(m, FastFeedForward))
        assert layer.chunk_rows(torch.randn(64, 512, 32)) is None, method
