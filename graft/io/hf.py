"""Hugging Face-format folders: find them (locally or on the Hub), read and write their files."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.io.atomic import atomic_path
from graft.io.torchfile import load_torch_file

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


def weight_files(folder: Path) -> tuple[list[Path], Path]:
    """The files holding a checkpoint's tensors (one, or the shards of an index) and the file
    that names them (the index, or the one file)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.exists():
            break
    else:
        raise GraftError(f"{folder}: no weights in this folder (looked for {', '.join(WEIGHT_FILES)})")
    if not name.endswith(".index.json"):
        return [path], path
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise GraftError(f"{path}: missing key 'weight_map' (an object: tensor name -> shard file)")
    shards = set(weight_map.values())
    # a shard is a file of this folder: an index cannot send graft to read files elsewhere
    if bad := next((s for s in shards if not isinstance(s, str) or Path(s).name != s), None):
        raise GraftError(f"{path}: shard {bad!r} is not a file name in this folder")
    return [folder / shard for shard in sorted(shards)], path


def weight_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], Path]:
    """Every tensor's name and shape, read without the tensors: from the safetensors headers, or
    from a PyTorch file mapped in memory. Cheap, so a config can be checked before a model is built."""
    files, source = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if not path.exists():
            raise GraftError(f"{path}: weight file not found")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
            except (SafetensorError, OSError, ValueError) as e:
                raise GraftError(f"{path}: not a valid safetensors file ({_first_line(e)})") from None
        else:
            state = _read_torch(path, mmap=zipfile.is_zipfile(path))  # zip: tensors mapped, not read
            shapes.update({name: tuple(t.shape) for name, t in state.items()})
    return shapes, source


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a checkpoint (single file or shards) and the file they came from."""
    files, source = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_file(path))
    if source.name.endswith(".index.json"):
        missing = sorted(set(read_json(source)["weight_map"]) - set(state))
        if missing:
            raise GraftError(f"{source}: tensor {missing[0]!r} is listed but not in its shard")
    return state, source


def read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise GraftError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise GraftError(f"{path}: not a valid safetensors file ({_first_line(e)})") from None
    return _read_torch(path)


def _read_torch(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    state = load_torch_file(path, "PyTorch weights file", mmap=mmap)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()
    ):
        raise GraftError(f"{path}: expected a dict of tensors")
    return state


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


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
