"""The model a server holds: loaded once from whatever graft loads, with its tokenizer and task."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.tasks import TaskModel

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Served:
    """One loaded model shared by every request: the model, its tokenizer, what it does."""

    model: nn.Module  # a bare Transformer (task "base") or a TaskModel
    tokenizer: Any
    name: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    keep: Any = None  # a temporary folder (a converted GGUF file) that lives as long as the model

    @property
    def task(self) -> str:
        return self.model.task if isinstance(self.model, TaskModel) else "base"

    @property
    def body(self) -> nn.Module:
        return self.model.body if isinstance(self.model, TaskModel) else self.model

    @property
    def config(self):
        return self.body.config

    @property
    def generates(self) -> bool:
        """A causal LM: served by continuous batching; every other model by the token-budget queue."""
        return self.task == "causal-lm"

    @property
    def max_length(self) -> int:
        """Tokens one input may hold: the model's window."""
        return self.config.max_positions - getattr(self.body, "virtual_tokens", 0)

    @property
    def labels(self) -> list[str] | None:
        head = getattr(self.model, "head", None)
        id2label = getattr(head, "id2label", None)
        if not id2label:
            return None
        return [str(id2label[i]) for i in sorted(id2label)] if isinstance(id2label, dict) else list(id2label)

    def info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model": self.name,
            "family": cfg.family,
            "task": self.task,
            "labels": self.labels,
            "max_length": self.max_length,
            "hidden_size": cfg.hidden_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "chat": bool(getattr(self.tokenizer, "chat_template", None)),
        }


def model_folder(path: Path) -> Path:
    """A run folder (train.output) holds its model in model/; any other folder is the model."""
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    return path


def load_served(
    model: str,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    reference: bool = False,
) -> Served:
    """Load MODEL as ``graft serve`` does: a HF folder or Hub id, a run folder, a .gguf file, or an
    adapter (or strategy checkpoint) folder on top of ``base``."""
    from graft.io.hf import read_json, resolve
    from graft.loading import load_adapter_model, load_model, load_trained
    from graft.strategies.checkpoint import META
    from graft.tokenizer import Tokenizer

    keep = None
    if model.endswith(".gguf"):
        from graft.io.gguf import convert_gguf

        keep = tempfile.TemporaryDirectory(prefix="graft-serve-gguf-")
        folder = convert_gguf(model, Path(keep.name) / "model")
    else:
        folder = model_folder(resolve(model))
    if (folder / ADAPTER_CONFIG).exists() or (folder / META).exists():
        if base is None:
            base = read_json(folder / ADAPTER_CONFIG, missing_ok=True).get("base_model_name_or_path")
        if not base:
            raise GraftError(f"{folder}: an adapter or strategy checkpoint; give its base model with --base")
        base_folder = model_folder(resolve(base))
        if (folder / ADAPTER_CONFIG).exists():
            m = load_adapter_model(base_folder, folder)
        else:
            m = load_trained(base_folder, folder)
        if dtype is not None:
            m.to(dtype=dtype)
        if not reference:
            import graft.kernels

            graft.kernels.optimize(m)
        has_tokenizer = any(
            (folder / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        )
        tokenizer = Tokenizer.from_folder(folder if has_tokenizer else base_folder)
    else:
        task = "causal-lm" if _is_decoder(folder) else None
        m = load_model(folder, task=task, dtype=dtype, kernels=not reference)
        tokenizer = Tokenizer.from_folder(folder)
    defaults = {}
    if (folder / "generation_config.json").exists():
        defaults = read_json(folder / "generation_config.json")
    return Served(m.eval(), tokenizer, served_name(model), defaults, keep)


def served_name(model: str) -> str:
    """The id /v1/models shows: the folder's name (a run folder's, not its model/ subfolder's)."""
    path = Path(model.rstrip("/"))
    if path.name == "model" and path.parent.name:
        return path.parent.name
    return path.stem if path.suffix == ".gguf" else path.name or model


def _is_decoder(folder: Path) -> bool:
    """A bare decoder checkpoint (e.g. a converted GGUF file) is served as the causal LM it is."""
    from graft.loading import load_config

    _, cfg = load_config(folder)
    return bool(cfg.causal)
