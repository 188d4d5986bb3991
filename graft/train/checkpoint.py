"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

A checkpoint is a folder ``checkpoints/step-00000120/`` holding the model, the optimizer, the
scheduler, the grad scaler, the trainer's position (epoch, step, best metric...) and every
process's RNG states. It is written under a temporary name, each file fsynced, a manifest of
the files and their sizes last, then renamed: a folder named ``step-*`` is complete, and one
that is not (damaged, half copied, or left by an older graft that deleted a step's folder to
write it again) is recognised and never resumed from. Model and optimizer states are full (unsharded)
and keyed by parameter name, so a checkpoint of a DDP or FSDP run resumes on one process and
the other way round. torch.distributed.checkpoint is imported where it is used: importing it
takes half a second and 45 MB (it pulls in sympy), in every run, checkpointing or not.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from graft.io.atomic import fsync_dir
from graft.io.torchfile import load_torch_file

PATTERN = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"  # written last: {file name: size in bytes}
REQUIRED = ("model.pt", "optimizer.pt", "trainer.pt", "rng-0.pt")  # what a folder without one must hold


def rng_state() -> dict[str, Any]:
    """Every generator's state, in types torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_json(data: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: Path) -> Any:
    """A checkpoint file, read without running any code it may carry (tensors and plain values only)."""
    return load_torch_file(path, "checkpoint file")


def incomplete(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is whole."""
    try:
        sizes = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:  # written before manifests: whole when every file is there
        sizes = dict.fromkeys(REQUIRED)
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"no {name}"
        if size is not None and file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size}"
    return None


def scan(folder: Path) -> list[tuple[int, Path, str | None]]:
    """Every ``step-*`` folder in ``folder``, oldest first, with why it is incomplete (None: whole)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [(step, path, incomplete(path)) for step, path in sorted(found)]


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first."""
    return [(step, path) for step, path, why in scan(folder) if why is None]


def latest(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def remove(path: Path) -> None:
    """Delete a folder without ever leaving half of it under its name (a crash may stop rmtree midway)."""
    doomed = path.with_name(f".{path.name}.delete")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int = 2,
    protect: tuple[int, ...] = (),
) -> Path:
    """Write checkpoint ``step`` atomically (every process must call this), then prune old ones.

    ``keep`` newest checkpoints survive pruning, and so do the steps in ``protect`` (the best).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    rank, world = rank_world()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)  # collective under FSDP
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file(rng_state(), tmp / f"rng-{rank}.pt")
    if rank == 0:
        save_file(model_state, tmp / "model.pt")
        save_file(optim_state, tmp / "optimizer.pt")
        save_file({**trainer_state, "world_size": world}, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        save_json({"step": step, "files": sizes}, tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():  # an incomplete leftover (a run never writes a step twice): moved out first
            remove(final)
        os.replace(tmp, final)
        fsync_dir(folder)
        prune(folder, keep, protect + (step,))
    barrier()
    return final


def prune(folder: Path, keep: int, protect: tuple[int, ...]) -> None:
    """Remove all but the ``keep`` newest complete checkpoints and ``protect``; and older incomplete ones."""
    found = scan(folder)
    whole = [step for step, _, why in found if why is None]
    newest = set(whole[-keep:]) if keep > 0 else set()
    for step, path, why in found:
        if (why is None and step not in newest and step not in protect) or (
            why and whole and step < whole[-1]
        ):
            remove(path)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Load model (and optimizer) states; restore this process's RNG states; return the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    rank, world = rank_world()
    model_state = read_file(path / "model.pt")
    optim_state = read_file(path / "optimizer.pt") if optimizer else None
    options = StateDictOptions(full_state_dict=True, strict=True)
    if optimizer is None:
        set_model_state_dict(model, model_state, options=options)
    else:
        # How the update runs (fused, foreach) belongs to this process's tensors, not to the checkpoint:
        # a fused CPU optimizer saved by one process resumes as a foreach one on FSDP shards.
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
        )
        for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
            group.update(kernel)
    state = read_file(path / "trainer.pt")
    rng = path / f"rng-{rank}.pt"
    if rng.exists():
        set_rng_state(read_file(rng))
    else:  # resumed on more processes than saved it: a fresh, still deterministic stream per process
        seed = int(state.get("seed", 0)) + 1000 * rank + int(state.get("global_step", 0))
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    return state


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the model weights of a checkpoint (the best model at the end of training)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model_state = read_file(path / "model.pt")
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=True))
