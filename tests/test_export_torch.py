"""TorchScript and torch.export files: parity-checked at export, then loaded by a fresh Python that
never imports graft (torch.jit.load / torch.export.load) and compared with graft's eager model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_export import eager, exports, fresh_inputs, representative, tiny_model

from graft.export import MANIFEST, export_model
from graft.models import FAMILIES

TOL = 1e-4

# one task per one-stack family (two stacks: test_export_seq2seq.py, test_export_clip.py): its causal
# LM, its image head or a text classifier
FAMILY_TASKS = [
    (f, representative(f))
    for f, family in FAMILIES.items()
    if exports(f, "base") and not (family.encoder_decoder or family.dual_encoder)
]

# run by `python -I` (no PYTHONPATH, no user site): torch alone, and it checks graft stayed out
LOADER = """
import sys, json, numpy as np, torch
fmt, jobs = sys.argv[1], json.loads(sys.argv[2])
for folder in jobs:
    manifest = json.load(open(folder + "/manifest.json"))
    path = folder + "/" + manifest["file"]
    module = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()
    inputs = np.load(folder + "/inputs.npz")
    with torch.no_grad():
        out = module(*(torch.from_numpy(inputs[i["name"]]) for i in manifest["inputs"]))
    out = out if isinstance(out, (tuple, list)) else (out,)
    np.savez(folder + "/outputs.npz", *[t.numpy() for t in out])
assert not [m for m in sys.modules if m.split(".")[0] == "graft"], "graft was imported"
print("ok", len(jobs))
"""


# torch.export takes twice the tracer's time on every family: the slow row
@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("exported-program", marks=pytest.mark.slow)])
def test_torch_files_load_without_graft_and_equal_graft(fmt, tmp_path):
    jobs, expected = [], {}
    for family, task in FAMILY_TASKS:
        model = tiny_model(family, task, tmp_path / family)
        out = tmp_path / f"{family}-out"
        manifest = export_model(model, out, fmt=fmt)
        assert manifest["format"] == fmt and manifest["parity"]["max_abs_diff"] <= TOL
        assert manifest["file"] == {"torchscript": "model.pt", "exported-program": "model.pt2"}[fmt]
        assert set(json.loads((out / MANIFEST).read_text())["files"]) == {p.name for p in out.iterdir()}
        assert not (out / "runtime.py").exists()  # the onnxruntime script is for ONNX folders
        if task == "causal-lm":  # the prompt (an empty past) of a left-padded batch: logits and presents
            from graft.export import prepared
            from graft.export.check import decoder_cases
            from graft.export.graph import graph_for

            case = decoder_cases(graph_for(prepared(model)))[0]
            inputs, want, real = case.inputs, [t.numpy() for t in case.expected], case.real.numpy()
        else:
            inputs = fresh_inputs(model)
            want = [eager(model, inputs).numpy()]
            real = (
                inputs["attention_mask"].bool().numpy()
                if want[0].ndim == 3 and "attention_mask" in inputs
                else None
            )
        np.savez(out / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
        jobs.append(str(out))
        expected[str(out)] = (want, real)

    run = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, fmt, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok", str(len(jobs))]
    for folder, (want, real) in expected.items():
        got = np.load(f"{folder}/outputs.npz")
        got = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(got) == len(want), folder
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.shape == w.shape, folder
            if i == 0 and real is not None:  # per-token outputs: the real tokens
                g, w = g[real], w[real]
            assert np.abs(w).max() > 0.01 or i > 0
            assert np.abs(g - w).max() <= TOL, folder


def test_onnx_only_flags_are_refused_for_torch_formats(tmp_path, cli):
    missing = tmp_path / "no-such-model"
    assert cli("export", missing, tmp_path / "o", "--format", "torchscript", "--int8").error_line() == (
        "error: --int8 is for --format onnx, not torchscript"
    )
    assert cli(
        "export", missing, tmp_path / "o", "--format", "exported-program", "--opset", "18"
    ).error_line() == ("error: --opset is for --format onnx, not exported-program")
    model = tiny_model("bert", "classification", tmp_path)
    with pytest.raises(Exception, match=r"^export: --optimize is for --format onnx, not torchscript$"):
        export_model(model, tmp_path / "o", fmt="torchscript", optimize=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("fmt", "family", "task"),
    [
        ("torchscript", "bert", "classification"),
        ("torchscript", "llama", "causal-lm"),
        pytest.param("exported-program", "bert", "classification", marks=pytest.mark.slow),
    ],
)
def test_bfloat16_exports_behind_a_float32_interface(fmt, family, task, tmp_path):
    """bfloat16 weights and computation: within BF16_TOLERANCE of graft's eager bfloat16 model (checked at
    export), close to float32 graft by direction, every weight in the file bfloat16."""
    import torch

    from graft.export.check import BF16_TOLERANCE
    from graft.export.pytorch import load, runner

    model = tiny_model(family, task, tmp_path)
    manifest = export_model(model, tmp_path / "bf16", fmt=fmt, dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16" and manifest["parity"]["tolerance"] == BF16_TOLERANCE
    assert manifest["parity"]["max_abs_diff"] <= BF16_TOLERANCE
    assert all(t["dtype"] in ("int64", "float32") for t in manifest["inputs"] + manifest["outputs"])
    file = manifest["file"]
    weights = load(fmt, tmp_path / "bf16" / file).state_dict().values()
    assert {t.dtype for t in weights if t.is_floating_point()} == {torch.bfloat16}
    inputs = fresh_inputs(model)
    names = [i["name"] for i in manifest["inputs"]]
    numpy = {k: v.numpy() for k, v in inputs.items()}
    if task == "causal-lm":  # the prompt, with an empty past
        from graft.export.graph import DecoderGraph, example_inputs

        numpy = {k: v.numpy() for k, v in example_inputs(DecoderGraph(model), 4, 13, seed=7).items()}
        inputs = {k: torch.from_numpy(numpy[k]) for k in ("input_ids", "attention_mask", "position_ids")}
    got = runner(fmt, tmp_path / "bf16" / file, names)(numpy)[0]
    want = eager(model, inputs).numpy()
    real = inputs["attention_mask"].bool().numpy() if want.ndim == 3 else slice(None)
    got, want = got[real].reshape(-1, want.shape[-1]), want[real].reshape(-1, want.shape[-1])
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert got.dtype == np.float32 and cosine.min() >= 0.99


def test_bfloat16_onnx_is_one_line(tmp_path, cli):
    missing = tmp_path / "no-such-model"  # refused before loading
    assert cli("export", missing, tmp_path / "o", "--dtype", "bfloat16").error_line() == (
        "error: --dtype bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul); export "
        "bfloat16 with --format torchscript or exported-program, or a smaller ONNX file with --int8"
    )
    assert cli(
        "export", missing, tmp_path / "o", "--format", "torchscript", "--dtype", "float16"
    ).error_line() == ("error: --dtype float16: not one of float32, bfloat16")
    assert not (tmp_path / "o").exists()
