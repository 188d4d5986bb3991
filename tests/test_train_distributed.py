"""The same loop under torchrun: DDP and FSDP (gloo, CPU) match one process with the same global batch,
and checkpoints move between one process and two."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("test_train_helpers.py")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def launch(out: Path, mode: str, processes: int, stop_at: int = 0, resume: bool = False) -> None:
    args = ["dist", str(out), mode, str(stop_at)] + (["--resume"] if resume else [])
    if processes == 1:
        command = [sys.executable, str(SCRIPT), *args]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", str(SCRIPT), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "step-00000005" / "model.pt")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single")
    launch(out, "none", 1)
    return weights(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, mode):
    launch(tmp_path, mode, 2)  # 2 processes x 2 micro-batches of 2 = one step of 8
    assert_close(single, weights(tmp_path))
    # the final model folder is whole (gathered from the shards under FSDP)
    from graft.loading import load_model

    saved = load_model(tmp_path / "model", task="token-classification", num_labels=3).state_dict()
    assert_close({k: v for k, v in weights(tmp_path).items() if k.startswith("body.")},
                 {k: v for k, v in saved.items() if k.startswith("body.")})  # fmt: skip


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoints_resume_across_process_counts(tmp_path, single, first, then):
    mode = "ddp"
    launch(tmp_path, mode, first, stop_at=3)
    assert (tmp_path / "checkpoints" / "step-00000003").is_dir()
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()
    launch(tmp_path, "fsdp" if then == 2 else "none", then, resume=True)
    assert_close(single, weights(tmp_path))
