"""``graft serve`` on a graft export folder (ONNX Runtime): the same endpoints and the same JSON as the
torch backend serving the folder it was exported from, within the export's parity tolerance (1e-4);
what an export cannot serve is a one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from test_export_backend import same_json
from test_predict_cli import LABELS, TAGS, task_folder
from test_serve import TEXTS, Server, free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def minilm_export(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "minilm-onnx"
    command = [sys.executable, "-m", "graft", "export", str(minilm), str(out), "--format", "onnx"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def both(folder, export, log, *args) -> tuple[Server, Server]:
    torch_server = Server(folder, *args, log=log / "torch.log")
    try:
        onnx_server = Server(export, *args, log=log / "onnx.log")  # auto-detected from manifest.json
    except BaseException:
        torch_server.close()
        raise
    return torch_server, onnx_server


def test_embeddings_from_an_onnx_export_equal_the_torch_backend(minilm, minilm_export, tmp_path):
    servers = both(minilm, minilm_export, tmp_path)
    try:
        answers = []
        for server in servers:
            c = server.client
            answers.append(
                {
                    "openai": c.post("/v1/embeddings", json={"input": TEXTS}).json(),
                    "embed": c.post("/embed", json={"inputs": TEXTS, "normalize": False}).json(),
                    "long": c.post("/embed", json={"inputs": "word " * 600, "truncate": True}).json(),
                    "tokenize": c.post("/tokenize", json={"input": TEXTS}).json(),
                    "chat": c.post("/v1/chat/completions", json=CHAT),
                    "predict": c.post("/predict", json={"inputs": "x"}),
                    "info": c.get("/info").json(),
                }
            )
    finally:
        for server in servers:
            server.close()
    torch_side, onnx_side = answers
    assert onnx_side["openai"].pop("model") == "minilm-onnx"  # each server names its own folder
    torch_side["openai"].pop("model")
    for key in ("openai", "embed", "long", "tokenize"):
        same_json([onnx_side[key]], [torch_side[key]])  # floats within 1e-4, the rest exactly
    for key in ("chat", "predict"):  # what an encoder cannot do, refused alike
        assert onnx_side[key].status_code == torch_side[key].status_code == 400
        message = onnx_side[key].json()["error"]["message"]
        assert message == torch_side[key].json()["error"]["message"].replace(
            minilm.parent.name, "minilm-onnx"
        )
    assert message == "minilm-onnx has no prediction head (base); use /embed"
    assert (
        onnx_side["chat"].json()["error"]["message"]
        == "minilm-onnx is a base model: it does not generate text"
    )
    # an export's runtime has threads of its own: one worker; torch's share its threads (two workers)
    workers = [side["info"]["batching"].pop("workers") for side in (onnx_side, torch_side)]
    assert workers == [1, min(2, torch.get_num_threads())]
    info = {k: v for k, v in onnx_side["info"].items() if k not in ("backend", "parameters", "model")}
    assert info == {k: v for k, v in torch_side["info"].items() if k in info}
    assert (onnx_side["info"]["backend"], torch_side["info"]["backend"]) == ("onnx", "torch")


@pytest.mark.parametrize(
    ("cls", "labels"),
    [
        (transformers.AutoModelForSequenceClassification, LABELS),
        (transformers.AutoModelForTokenClassification, TAGS),
    ],
)
def test_predict_from_an_onnx_export_equals_the_torch_backend(tmp_path, minilm, cli, cls, labels):
    folder = task_folder(tmp_path, minilm, cls, id2label=dict(enumerate(labels)))
    out = tmp_path / "out"
    cli("export", folder, out, "--format", "onnx").ok()
    records = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
    servers = both(folder, out, tmp_path, "--max-wait-ms", "50")
    try:
        got = [s.client.post("/predict", json={"inputs": records}).json()["predictions"] for s in servers]
        explicit = Server(out, "--backend", "onnx", log=tmp_path / "explicit.log")
        try:
            assert explicit.client.get("/info").json()["backend"] == "onnx"
        finally:
            explicit.close()
    finally:
        for server in servers:
            server.close()
    same_json(got[1], got[0])  # labels and tags exactly, scores within TOL (1e-4)


def test_what_an_export_cannot_serve_is_one_line(tmp_path, minilm, minilm_export, cli):
    from test_serve_seq2seq import seq2seq_folder

    decoder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama")
    cli("export", decoder, tmp_path / "lm", "--format", "onnx").ok()
    cli("export", seq2seq_folder(tmp_path / "t5", "t5"), tmp_path / "t5-onnx", "--format", "onnx").ok()
    port = ["--port", free_port()]
    cases = [
        ((minilm, "--backend", "onnx"),
         f"error: --backend onnx: {minilm} is not an exported folder (no manifest.json); graft export it first"),
        ((minilm_export, "--backend", "onx"), "error: --backend onx: not one of torch, onnx, torchscript; did you mean 'onnx'?"),
        ((minilm_export, "--backend", "torch"),
         f"error: --backend torch: {minilm_export} is a graft export folder (no torch weights); drop --backend "
         "to run it with its runtime, or serve the model folder it was exported from"),
        ((minilm_export, "--dtype", "bfloat16"),
         f"error: --dtype: for the torch backend; {minilm_export} (a graft export folder) runs the exported file as it is"),
        ((minilm_export, "--backend", "onnx", "--base", minilm),
         "error: --base: for the torch backend; --backend onnx runs the exported file as it is"),
        ((tmp_path / "lm",),
         f"error: {tmp_path / 'lm'} (a graft export folder): an exported causal LM generates greedily, one batch "
         "at a time, and cannot join graft serve's continuous batching; serve the model folder it was exported from"),
        ((tmp_path / "t5-onnx",),
         f"error: {tmp_path / 't5-onnx'} (a graft export folder): graft serve runs an exported encoder over text; "
         "this is an exported seq2seq model: serve the model folder it was exported from"),
    ]  # fmt: skip
    for args, line in cases:
        assert cli("serve", *args, *port).error_line() == line
