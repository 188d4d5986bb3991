"""Checkpoints: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

from graft.train.checkpoint import list_checkpoints
from graft.train.loggers import read_metrics

SCRIPT = Path(__file__).with_name("test_train_helpers.py")


def run(out: Path, kill_at: int = 0, resume: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), str(out), str(kill_at)] + (["--resume"] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent)


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert run(full).returncode == 0
    killed = run(broken, kill_at=7)  # 5 steps per epoch: step 7 is in the middle of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert max(step for step, _ in list_checkpoints(broken / "checkpoints")) == 6
    assert read_metrics(broken)[-1]["step"] == 7  # logged after the checkpoint, lost with the kill
    resumed = run(broken, resume=True)
    assert resumed.returncode == 0, resumed.stderr

    def final(run_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / "step-00000010" / "model.pt")

    a, b = final(full), final(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in read_metrics(full)] == [r["loss"] for r in read_metrics(broken)]
    assert [r["step"] for r in read_metrics(broken)] == list(range(1, 11))
    assert read_metrics(full, "eval") == read_metrics(broken, "eval")
    result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (full, broken))
    assert {k: v for k, v in result_a.items() if k != "train_seconds"} == {
        k: v for k, v in result_b.items() if k != "train_seconds"
    }


class _Payload:
    """An object whose unpickling would run code: os.system in a real attack."""

    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_a_checkpoint_file_carrying_code_is_refused_without_running_it(tmp_path, capsys):
    import pytest

    from graft.errors import GraftError
    from graft.train.checkpoint import read_file, rng_state, save_file

    save_file(rng_state(), tmp_path / "rng-0.pt")
    assert set(read_file(tmp_path / "rng-0.pt")) >= {"python", "numpy", "torch"}  # graft's own: plain values
    save_file({"global_step": 3, "hook": _Payload()}, tmp_path / "trainer.pt")
    with pytest.raises(
        GraftError, match=r"trainer\.pt: refused, it holds more than tensors and plain values"
    ):
        read_file(tmp_path / "trainer.pt")
    assert "code from a checkpoint ran" not in capsys.readouterr().out
    (tmp_path / "model.pt").write_bytes((tmp_path / "rng-0.pt").read_bytes()[:100])  # cut short
    with pytest.raises(GraftError, match=r"model\.pt: not a readable checkpoint file \("):
        read_file(tmp_path / "model.pt")
    (tmp_path / "optimizer.pt").write_bytes(b"not a checkpoint\n" * 8)
    with pytest.raises(
        GraftError, match=r"optimizer\.pt: not a readable checkpoint file \(damaged, or not written"
    ):
        read_file(tmp_path / "optimizer.pt")


def test_resume_refuses_recipe_changes_that_make_another_run(tmp_path):
    import pytest
    from test_train_helpers import collate, tiny_data, tiny_model, tiny_recipe

    from graft.errors import GraftError
    from graft.train import Trainer

    def fit(**sections):
        recipe = tiny_recipe(tmp_path, **{"checkpoint": {"every": 1}, **sections})
        return Trainer(tiny_model(), recipe, tiny_data(), collate, quiet=True).fit(resume=True)

    fit(train={"max_steps": 2})
    with pytest.raises(GraftError) as error:
        fit(
            train={"max_steps": 4, "batch_size": 4, "seed": 3},
            optim={"weight_decay": 0.1},
            data={"max_length": 64},
        )
    step = tmp_path / "checkpoints" / "step-00000002"
    assert str(error.value) == (
        f"{step}: --resume continues a run with the recipe it started with, and these differ: "
        "data.max_length 128 -> 64, optim.weight_decay 0.01 -> 0.1, train.batch_size 8 -> 4, train.seed 0 -> 3; "
        "change them back, or start a new run (another train.output, or --overwrite)"
    )


def test_resume_applies_and_logs_the_changes_it_allows(tmp_path, caplog):
    from test_train_helpers import collate, tiny_data, tiny_model, tiny_recipe

    from graft.train import Trainer, load_recipe
    from graft.train.config import ScheduleSection
    from graft.train.schedules import lr_factor

    def fit(**sections):
        recipe = tiny_recipe(tmp_path, **{"checkpoint": {"every": 1}, **sections})
        Trainer(tiny_model(), recipe, tiny_data(), collate, quiet=True).fit(resume=True)
        return recipe

    fit(train={"max_steps": 2}, optim={"lr": 1e-2})
    with caplog.at_level("INFO", logger="graft"):  # longer, a lower lr, the same 8 examples a step
        recipe = fit(train={"max_steps": 4, "batch_size": 4, "accumulate": 2}, optim={"lr": 1e-3})
    assert f"{tmp_path}: resuming with a changed recipe (applied from step 2 on): optim.lr 0.01 -> 0.001, " \
           "train.accumulate 1 -> 2, train.batch_size 8 -> 4, train.max_steps 2 -> 4" in caplog.messages  # fmt: skip
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    assert lrs == [1e-2 * lr_factor(ScheduleSection(), s, 2) for s in (0, 1)] + [
        1e-3 * lr_factor(ScheduleSection(), s, 4) for s in (2, 3)
    ]
    assert load_recipe(tmp_path / "config.yaml") == recipe  # the recipe in force
    state = torch.load(tmp_path / "checkpoints" / "step-00000004" / "trainer.pt")
    assert state["recipe"] == recipe.to_dict()
