"""Crash consistency: training stopped dead at every write, rename and removal it makes on disk
resumes to exactly the uninterrupted run's end, and a model folder is always the old one or the
new one, never a mix.

The crash points are the run's own disk operations (os.fsync after each file, os.replace, shutil.rmtree,
os.unlink), counted as they happen. In this process a crash is an exception that also fails every later
disk operation, so no clean-up runs, as after a kill; the SIGKILL tests kill a real training process at
named points (each file of the final checkpoint, the final model folder's renames), all of them under
``-m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_helpers import collate, tiny_data, tiny_model, tiny_recipe

from graft.train import Trainer
from graft.train.checkpoint import list_checkpoints, scan
from graft.train.loggers import read_metrics

OPS = {
    "replace": (os, "replace"),
    "fsync": (os, "fsync"),
    "rmtree": (shutil, "rmtree"),
    "unlink": (os, "unlink"),
}


class Crash(BaseException):
    """The process died here (BaseException: no `except Exception` in graft may swallow it)."""


class Disk:
    """Counts the disk operations of a run under ``root``; at the ``at``-th one and every one after it,
    crashes; just before the one named ``kill``, SIGKILLs the process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, at: int = 0, kill: str = "") -> None:
        self.root, self.at, self.kill, self.events, self.crashed = root.resolve(), at, kill, [], False
        for op, (module, name) in OPS.items():
            monkeypatch.setattr(module, name, self.wrap(op, getattr(module, name)))

    def wrap(self, op: str, real):
        def call(*args, **kwargs):
            target = args[0]
            path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else os.fspath(target)
            if not str(Path(path).resolve()).startswith(str(self.root)):
                return real(*args, **kwargs)  # not the run's: pytest's own files
            self.events.append(f"{op} {Path(path).resolve().relative_to(self.root)}")
            if self.events[-1] == self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.crashed or len(self.events) == self.at:
                self.crashed = True
                raise Crash(self.events[-1])
            return real(*args, **kwargs)

        return call


def run(out: Path, resume: bool = False, overwrite: bool = False, seed: int = 0) -> dict:
    """2 epochs of 5 steps with dropout; evaluations every 3 steps, checkpoints every 5 and at each best
    evaluation, the model folder. Step 10 is the last step of both: an older graft saved it, evaluated,
    then deleted and saved it again."""
    recipe = tiny_recipe(
        out, train={"epochs": 2, "batch_size": 4, "accumulate": 2, "seed": seed}, eval={"every": 3},
        checkpoint={"every": 5, "keep": 2, "save_model": True},
    )  # fmt: skip
    data = tiny_data(40)
    trainer = Trainer(tiny_model(seed=seed, dropout=0.1), recipe, data, collate, data[:8], quiet=True)
    return trainer.fit(resume, overwrite)


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def final_state(out: Path) -> dict:
    weights = torch.load(out / "checkpoints" / "step-00000010" / "model.pt")
    result = json.loads((out / "result.json").read_text())
    result.pop("train_seconds")
    return {
        "weights": {k: v.tolist() for k, v in weights.items()},
        "losses": [r["loss"] for r in read_metrics(out)],
        "steps": [r["step"] for r in read_metrics(out)],
        "evals": read_metrics(out, "eval"),
        "result": result,
        "model": model_files(out / "model"),
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is 20x faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, list[str]]:
    """The uninterrupted run's end, and the disk operations it makes."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp, out)
        run(out)
    return final_state(out), disk.events


def crash_then_resume(tmp_path: Path, at: int) -> tuple[dict, str]:
    out = tmp_path / f"crash-{at}"
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp, out, at)
        with pytest.raises(Crash):
            run(out)
    assert all(why is None for _, _, why in scan(out / "checkpoints")), scan(out / "checkpoints")
    run(out, resume=True)
    return final_state(out), disk.events[at - 1]


def test_the_reference_run_touches_every_phase(reference):
    _, events = reference
    names = " ".join(events)
    for point in ("rng-0.pt", "model.pt", "optimizer.pt", "trainer.pt", "manifest.json",
                  "replace checkpoints/.step-00000010.tmp", "model.safetensors", "config.json",
                  "replace .model.tmp", "result.json", ".delete"):  # fmt: skip
        assert point in names, point


def final_phase(events: list[str]) -> int:
    """Where the last checkpoint (the final evaluation's save) begins: the phases the fast tests sweep."""
    return events.index("rmtree checkpoints/.step-00000010.tmp")


def test_a_crash_at_any_disk_operation_of_the_final_phase_resumes_to_the_same_end(tmp_path, reference):
    """The final checkpoint's files and rename, the pruning, the model folder, result.json."""
    expected, events = reference
    for at in range(final_phase(events) + 1, len(events) + 1):
        state, where = crash_then_resume(tmp_path, at)
        for key in expected:
            assert state[key] == expected[key], f"crash at {where!r}: {key} differs"


@pytest.mark.slow
def test_a_crash_at_any_earlier_disk_operation_resumes_to_the_same_end(tmp_path, reference):
    expected, events = reference
    for at in range(1, final_phase(events) + 1):
        state, where = crash_then_resume(tmp_path, at)
        for key in expected:
            assert state[key] == expected[key], f"crash at {where!r}: {key} differs"


def test_resume_skips_a_checkpoint_left_incomplete_and_says_so(tmp_path, reference, caplog):
    """What an older graft left when killed while it wrote the last step a second time: step-10/
    without model.pt (and checkpoints without manifests). Resume starts from step 9, names the
    folder it skipped, and ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    run(out)
    for _, path in list_checkpoints(out / "checkpoints"):
        (path / "manifest.json").unlink()
    (out / "checkpoints" / "step-00000010" / "model.pt").unlink()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [9]
    with caplog.at_level("WARNING", logger="graft"):
        run(out, resume=True)
    skipped = out / "checkpoints" / "step-00000010"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{skipped}: incomplete checkpoint (no model.pt), skipped; resuming from step-00000009"
    ]
    assert final_state(out) == reference[0]
    (skipped / "optimizer.pt").write_bytes(b"cut")  # a damaged file: its size is not the manifest's
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [9]


@pytest.mark.parametrize("phase", ["model", pytest.param("all", marks=pytest.mark.slow)])
def test_the_old_model_stays_whole_until_the_new_one_replaces_it(tmp_path, phase):
    """--overwrite on a finished run, crashed at each disk operation (fast: from the final checkpoint
    on): the model folder is the old one or the new one (absent only between the two renames, the old
    one whole aside), and the next run puts the new one in place."""
    new_run, finished = tmp_path / "new", tmp_path / "finished"
    run(new_run, seed=1)
    run(finished)
    new, old = model_files(new_run / "model"), model_files(finished / "model")
    assert old != new and old.keys() == new.keys()
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.MonkeyPatch.context() as mp:
        disk = Disk(mp, out)
        run(out, overwrite=True, seed=1)
    seen = set()
    first = 1 if phase == "all" else final_phase(disk.events) + 1
    for at in range(first, len(disk.events) + 1):
        shutil.rmtree(out)
        shutil.copytree(finished, out)
        with pytest.MonkeyPatch.context() as mp:
            Disk(mp, out, at)
            with pytest.raises(Crash):
                run(out, overwrite=True, seed=1)
        now, where = model_files(out / "model"), disk.events[at - 1]
        if not now:
            assert model_files(out / ".model.old") == old, where
            seen.add("aside")
        else:
            assert now in (old, new), f"a mix after a crash at {where!r}"
            seen.add("old" if now == old else "new")
        run(out, overwrite=True, seed=1)
        assert model_files(out / "model") == new, where
    assert seen == {"old", "aside", "new"}


# ---- SIGKILL --------------------------------------------------------------------------------


def child(out: str, kill: str, resume: bool) -> None:
    """Train in this process; SIGKILL it just before the disk operation named ``kill``."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        Disk(mp, Path(out), kill=kill)
        run(Path(out), resume=resume)


def sigkill_run(out: Path, kill_at: str = "", resume: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, __file__, str(out), kill_at] + (["--resume"] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)


KILL_POINTS = [
    "fsync checkpoints/.step-00000010.tmp/model.pt",  # inside the final checkpoint's files
    "fsync checkpoints/.step-00000010.tmp/manifest.json",
    "replace checkpoints/.step-00000010.tmp",  # the rename that commits it
    "replace .model.tmp",  # the final model folder: the second of its two renames
    "fsync .model.tmp/model.safetensors",
]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_at_named_points_resumes_to_the_same_end(tmp_path, reference, kill_at):
    expected, events = reference
    assert kill_at in events
    out = tmp_path / "run"
    killed = sigkill_run(out, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert all(why is None for _, _, why in scan(out / "checkpoints"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")]
    resumed = sigkill_run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert final_state(out) == expected


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3:] == ["--resume"])
