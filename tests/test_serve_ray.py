"""``graft serve MODEL --ray --replicas 2``: the same app on Ray Serve, two copies of the model on
this machine behind Ray's proxy, answering as graft embed does (when ray is installed: graft[ray])."""

from __future__ import annotations

import time

import pytest
import torch
from test_serve import TEXTS, Server

from graft.tokenizer import Tokenizer


def test_two_replicas_answer_as_graft_embed(tmp_path, minilm):
    pytest.importorskip("ray", reason="pip install 'graft[ray]'")
    from graft.loading import load_model
    from graft.tasks.embedding import embed

    expected = embed(load_model(minilm, task="base"), Tokenizer.from_folder(minilm), TEXTS, normalize=True)
    server = Server(minilm, "--ray", "--replicas", "2", log=tmp_path / "serve.log")
    try:
        while "graft serve: 2 replicas on Ray Serve, ready on" not in server.stderr():
            assert server.proc.poll() is None, server.stderr()  # said after /health answers: wait for it
            time.sleep(0.2)
        for _ in range(6):  # spread over both replicas by Ray's router: each must answer alike
            got = server.client.post("/v1/embeddings", json={"input": TEXTS}).json()
            torch.testing.assert_close(
                torch.tensor([d["embedding"] for d in got["data"]]), expected, atol=1e-5, rtol=0
            )
    finally:
        server.close()
    assert server.proc.returncode == 0  # SIGTERM took the deployment down


def test_replicas_without_ray_is_one_line(cli, minilm):
    assert cli("serve", minilm, "--replicas", "2").error_line() == (
        "error: --replicas: only with --ray (one process serves one copy of the model)"
    )
