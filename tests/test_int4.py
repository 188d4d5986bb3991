"""graft quantize --method int4-weight: 4-bit groups from float weights against the float linear,
the portable code layout, every decoder family saved and loaded back bitwise, a GGUF file's own
blocks kept, and the errors (every family that is not a decoder, a width the groups do not divide)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import hf_model, padded_batch, tiny_hf_config
from safetensors.torch import load_file
from test_gguf import write_tiny_gguf
from test_int4_gguf import SMOLLM, float_weight, needs_smollm, random_blocks
from test_predict_cli import task_folder

from graft.compress.quantize import quantize, quantize_folder
from graft.errors import GraftError
from graft.io.gguf import read_4bit_blocks
from graft.kernels.int4 import GROUP, Int4Linear, pack_codes, quantize_groups, unpack_codes
from graft.loading import load_model, save_model
from graft.models import FAMILIES

BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 bits of significand)
DECODERS = sorted(f for f, family in FAMILIES.items() if family.decoder)
OTHERS = sorted(set(FAMILIES) - set(DECODERS))


def weight_with_odd_groups(out_features: int = 48, in_features: int = 96) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.05
    w[3, :32] *= 40  # an outlier group: its own scale keeps the row's other groups fine
    w[5, 32:64] = 0.25  # a constant group: its minimum, exactly, and no NaN
    w[6] = 0  # an all-zero row
    return w


def test_groups_round_each_weight_to_within_half_a_step():
    w = weight_with_odd_groups()
    q, d, m = quantize_groups(w)
    assert q.dtype == torch.uint8 and q.max() <= 15 and d.shape == m.shape == (48, 96 // GROUP)
    step = d.repeat_interleave(GROUP, dim=1)  # (out, in)
    back = float_weight(q, d, m)
    assert ((back - w).abs() <= step / 2 + 1e-6 * w.abs().amax()).all()
    assert torch.equal(back[5, 32:64], w[5, 32:64]) and back[6].eq(0).all()
    # each group uses its whole range: codes 0 and 15 at its minimum and maximum
    grouped = q.reshape(48, -1, GROUP)[d > 1e-9]
    assert grouped.amin(-1).eq(0).all() and grouped.amax(-1).eq(15).all()


def error_bound(w: torch.Tensor, layer: Int4Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """|int4 output - float output| per element, derived from the groups.

    Each weight rounds to within d/2 of its group's step d; the kernel reads the scale d and the zero
    z = m + 8d in bf16, (q - 8) * bf16(d) + bf16(z): |q - 8| <= 8 more roundings of d and one of z,
    BF16_U (8d + |z|). The input rounds to bf16, and the dequantized weight may too (2 BF16_U of
    |x| times |w| plus its error), the output too, and a bf16 input's bias and sum (2 BF16_U of |y|
    plus |bias|), plus fp32 accumulation, 1e-5 of the sum of |terms|.
    """
    d, z = layer.weight_scale, layer.weight_min + 8 * layer.weight_scale  # (out, in/32)
    per_weight = (d / 2 + BF16_U * (8 * d + z.abs())).repeat_interleave(GROUP, dim=1)  # (out, in)
    rows = x.reshape(-1, x.shape[-1]).abs()  # (N, in)
    weights = rows @ per_weight.t() + 2 * BF16_U * rows @ (w.abs() + per_weight).t()  # (N, out)
    y = (rows @ w.abs().t()).reshape(*x.shape[:-1], -1)
    bound = weights.reshape(y.shape)
    return bound + 2 * BF16_U * (y + bias.abs() + bound) + 1e-5 * y


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_from_float_is_within_the_bound_its_groups_give(bias):
    w = weight_with_odd_groups()
    linear = torch.nn.Linear(96, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int4Linear.from_linear(linear)
    assert layer.weight.numel() == w.numel() // 2  # half a byte per weight
    x = torch.randn(2, 7, 96)  # (B, T, in)
    x[0, 2] *= 50  # an outlier token
    with torch.inference_mode():
        want = linear(x)
        for rows in (x, x[:1, :1], x.bfloat16()):  # many rows, one row (decoding), bf16 input
            got = layer(rows)
            assert got.dtype == rows.dtype and got.shape == want[: len(rows), : rows.shape[1]].shape
            diff = (got.float() - want[: len(rows), : rows.shape[1]]).abs()
            bias_ = linear.bias.detach() if bias else torch.zeros(48)
            assert (diff <= error_bound(w, layer, rows.float(), bias_)).all()


def test_codes_come_back_from_the_kernels_layout_exactly():
    """The kernel packs rows in blocks of 64 (AVX-512) or 32 (AVX2) with their own nibble order:
    ``codes`` recovers the portable layout whatever the block, 48 (a partial block) and 160 rows."""
    for out_features in (48, 160):
        q, d, m = random_blocks(out_features, 64, seed=out_features)
        layer = Int4Linear.from_q4_1(q, d, m)
        assert torch.equal(layer.codes(), pack_codes(q))
        assert torch.equal(unpack_codes(pack_codes(q)), q)
        assert pack_codes(q)[0, 0] == q[0, 0] | (q[0, 1] << 4)  # input 2j low, 2j + 1 high


def tiny_decoder(family: str, tmp_path):
    """A random tiny causal LM of ``family`` whose widths the 4-bit groups divide."""
    config = tiny_hf_config(family)
    if hasattr(config, "intermediate_size"):  # (32 and 37 in the shared tiny config)
        config.hidden_size, config.intermediate_size = 64, 64  # a head of 16 (Qwen2's one K/V head)
    torch.manual_seed(0)
    folder = tmp_path / f"{family}-float"
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    return folder


def logits(model) -> torch.Tensor:
    ids, mask = padded_batch()
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()  # (N, V)


@pytest.mark.parametrize("family", DECODERS)
def test_every_decoder_quantizes_to_int4_saves_and_loads_back_bitwise(family, tmp_path):
    folder = tiny_decoder(family, tmp_path)
    model = quantize(load_model(folder), "int4-weight")
    save_model(model, tmp_path / "q")
    again = load_model(tmp_path / "q")
    # every tensor, the derived bf16 (scale, zero) pairs the kernel reads included (not saved)
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys()
    for name, tensor in state.items():
        assert tensor.dtype == loaded[name].dtype and torch.equal(tensor, loaded[name]), name
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    loaded_layers = {n: m for n, m in again.named_modules() if isinstance(m, Int4Linear)}
    linears = [m for m in load_model(folder).body.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert layers.keys() == loaded_layers.keys() and len(layers) == len(linears)
    for name, layer in layers.items():
        assert torch.equal(layer.scale_zeros, loaded_layers[name].scale_zeros), name
    assert torch.equal(logits(again), logits(model))

    # the file: two codes per byte (uint8), fp32 scales and minimums per group; the rest float
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["method"] == "int4-weight" and config["int4_layers"] == len(layers)
    saved = load_file(tmp_path / "q" / "model.safetensors")
    codes = {k for k, v in saved.items() if v.dtype == torch.uint8}
    merged = 2 * len(model.body.layers) if family == "gpt2" else 0  # GPT-2's c_attn: Q, K, V as one
    assert len(codes) == len(layers) - merged
    for name in codes:
        assert saved[name + "_scale"].dtype == saved[name + "_min"].dtype == torch.float32
        assert saved[name + "_scale"].numel() * GROUP == saved[name].numel() * 2
    assert not any("norm" in k or "embed" in k or "wte" in k for k in codes)

    # and it agrees with the float model: each position's logits within 4-bit's rounding
    cos = F.cosine_similarity(logits(load_model(folder)), logits(again), dim=-1)
    assert cos.min() >= 0.99, cos.min()


def test_int4_folder_generates_through_the_cli(tmp_path, minilm, cli):
    """The CLI's greedy completion is the loaded model's (the folder carries its tokenizer)."""
    from graft.generation import encode_prompts, generate
    from graft.tokenizer import Tokenizer

    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama", intermediate_size=64
    )
    line = cli("quantize", folder, tmp_path / "q", "--method", "int4-weight").ok().stdout
    assert line.startswith(f"wrote {tmp_path / 'q'} (int4-weight: weights ")
    done = cli("generate", tmp_path / "q", "-p", "Once upon a time", "-n", "5", "--json").ok()
    model, tok = load_model(tmp_path / "q"), Tokenizer.from_folder(tmp_path / "q")
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    ids, mask = encode_prompts(tok, ["Once upon a time"])
    row = generate(model, ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
    row = row.tolist()
    end = row.index(2) if 2 in row else len(row)  # the tiny config's eos
    assert json.loads(done.stdout)["completion"] == tok.decode(row[:end])


def test_a_gguf_files_4bit_blocks_are_kept_exactly_and_the_rest_grouped(tmp_path, cli):
    """The tiny file's Q4_0 (attn_q) and Q4_1 (attn_k) blocks become the saved codes, scales and
    minimums as they are; its F16, BF16, Q8_0 and Q4_K layers are grouped from their float values."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cli("quantize", gguf, tmp_path / "q", "--method", "int4-weight").ok()
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["gguf_blocks"] == 4 and config["int4_layers"] == 14
    model = load_model(tmp_path / "q")
    body = model.body
    for hf_name, (q, d, m) in read_4bit_blocks(gguf).items():
        _, _, i, kind, proj = hf_name.removesuffix(".weight").split(".")
        layer = getattr(body.layers[int(i)].attn, proj.removesuffix("_proj"))
        assert torch.equal(layer.codes(), pack_codes(torch.from_numpy(q)))
        assert torch.equal(layer.weight_scale, torch.from_numpy(d).float())
        assert torch.equal(layer.weight_min, torch.from_numpy(m).float())
    assert isinstance(body.layers[1].ffn.down, Int4Linear) and isinstance(body.layers[0].attn.v, Int4Linear)


@needs_smollm
def test_smollm2_saved_from_its_gguf_generates_what_gguf_q4_generates(tmp_path, cli):
    """All 210 of SmolLM2's linears are Q4_1: the saved folder is the model `--gguf-q4` runs."""
    cli("quantize", SMOLLM, tmp_path / "q", "--method", "int4-weight").ok()
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["gguf_blocks"] == 210
    )
    args = ("-p", "The capital of France is", "-n", "8", "--json")
    want = json.loads(cli("generate", str(SMOLLM), *args, "--gguf-q4").ok().stdout)
    got = json.loads(cli("generate", tmp_path / "q", *args).ok().stdout)
    assert got == want


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", OTHERS)
def test_a_family_that_is_not_a_decoder_is_refused_in_one_line(family, tmp_path):
    hf_model(family).save_pretrained(tmp_path / "f")
    with pytest.raises(GraftError) as e:
        quantize_folder(tmp_path / "f", tmp_path / "q", "int4-weight")
    assert str(e.value) == (
        f"--method: int4-weight quantizes decoder-only language models (4-bit weights for decoding), "
        f"not {family}: use int8-weight or int8-dynamic"
    )
    assert not (tmp_path / "q").exists()


def test_a_config_that_says_int4_for_an_encoder_names_the_file(tmp_path):
    hf_model("bert").save_pretrained(tmp_path / "f")
    path = tmp_path / "f" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "graft", "method": "int4-weight"}})
    )
    with pytest.raises(GraftError) as e:
        load_model(tmp_path / "f")
    assert str(e.value) == (
        f"{path}: quantization_config: int4-weight quantizes decoder-only language models (4-bit weights "
        "for decoding), not bert: use int8-weight or int8-dynamic"
    )


@pytest.mark.parametrize(
    "family, sizes, layer",
    [
        ("llama", {"intermediate_size": 48}, "layers.0.ffn.down has 48 inputs, not a multiple of 32 (the 4-bit groups)"),
        ("llama", {}, "layers.0.ffn.gate has 37 outputs, not a multiple of 16 (the int4 kernel's blocks)"),
        ("qwen2", {"intermediate_size": 64}, "layers.0.attn.k has 8 outputs, not a multiple of 16 (the int4 kernel's blocks)"),
    ],
)  # fmt: skip
def test_a_width_the_kernel_cannot_take_is_one_line(family, sizes, layer, tmp_path, cli):
    config = tiny_hf_config(family)  # hidden 32 in heads of 8; Qwen2 with one K/V head
    for key, value in sizes.items():
        setattr(config, key, value)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "f")
    line = cli("quantize", tmp_path / "f", tmp_path / "q", "--method", "int4-weight").error_line()
    assert line == f"error: int4-weight: {layer}: use int8-weight"
    assert not (tmp_path / "q").exists()
