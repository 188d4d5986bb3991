"""Hugging Face-format folders: find them (locally or on the Hub), read and write their files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.io.atomic import atomic_path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*"]


def resolve(model: str | Path) -> Path:
    """A local folder, or a Hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GraftError(f"{path}: is a file, not a model folder (a .gguf file needs `graft convert`)")
    text = str(model)
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "")
    )
    if looks_like_path or not text:
        raise GraftError(f"{path}: model folder does not exist")
    return download(text)


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except HFValidationError:
        raise GraftError(f"{repo_id}: model folder does not exist and is not a valid Hub id") from None
    except RepositoryNotFoundError:
        raise GraftError(f"{repo_id}: no such folder, and no such model on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise GraftError(f"{repo_id}: no such folder, not in the Hugging Face cache, and {why}") from None
    except OSError as e:  # network errors
        raise GraftError(f"{repo_id}: could not download from the Hugging Face Hub ({e})") from None


def read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in ``path`` ({} for a missing file if ``missing_ok``); a one-line error otherwise."""
    if missing_ok and not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraftError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission...
        raise GraftError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise GraftError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise GraftError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise GraftError(f"{folder}: no config.json in this folder")
    return read_json(path)


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a checkpoint (single file or shards) and the file they came from."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.exists():
            break
    else:
        raise GraftError(f"{folder}: no weights in this folder (looked for {', '.join(WEIGHT_FILES)})")
    if name.endswith(".index.json"):
        index = read_json(path)
        if "weight_map" not in index:
            raise GraftError(f"{path}: missing key 'weight_map'")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_file(folder / shard))
        missing = sorted(set(index["weight_map"]) - set(state))
        if missing:
            raise GraftError(f"{path}: tensor {missing[0]!r} is listed but not in its shard")
        return state, path
    return read_file(path), path


def read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise GraftError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise GraftError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        raise GraftError(f"{path}: cannot read PyTorch weights ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise GraftError(f"{path}: expected a dict of tensors")
    return state


def write_weights(
    state: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str] | None = None
) -> Path:
    """model.safetensors, written atomically."""
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()},
            tmp,
            metadata={"format": "pt", **(metadata or {})},
        )
    return path
