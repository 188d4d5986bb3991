"""Load any registered family from a Hugging Face folder or Hub id, and save it back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError
from graft.io.atomic import write_json
from graft.io.hf import read_config, read_weights, resolve, write_weights
from graft.models.registry import FAMILIES, Family, family_for
from graft.nn import Transformer, TransformerConfig
from graft.tasks import HEADS, TaskModel

log = logging.getLogger("graft")

Model = Transformer | TaskModel


def load_config(folder: Path) -> tuple[Family, TransformerConfig]:
    path = folder / "config.json"
    hf = read_config(folder)
    try:
        family = family_for(hf.get("model_type"), source=str(path))
        return family, family.config_from_hf(hf)
    except GraftError as e:
        message = str(e)
        if message.startswith("config"):  # "config.json: ..." / "config: ..." -> the real path
            message = f"{path}:{message.split(':', 1)[1]}"
        raise GraftError(message) from None
    except (TypeError, ValueError) as e:
        raise GraftError(f"{path}: {e}") from None


def task_from_architectures(hf: dict[str, Any], family: Family) -> str:
    """The graft task that the checkpoint's HF class corresponds to."""
    by_class = {cls: task for task, cls in family.architectures.items()}
    for cls in hf.get("architectures") or []:
        if cls in by_class and by_class[cls] in HEADS or by_class.get(cls) == "base":
            return by_class[cls]
    return "causal-lm" if family.decoder else "base"


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints call LayerNorm parameters gamma and beta."""
    rename = {".gamma": ".weight", ".beta": ".bias"}
    return {
        next((k[: -len(s)] + r for s, r in rename.items() if k.endswith(s)), k): v for k, v in state.items()
    }


def load_model(
    model: str | Path,
    task: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Model:
    """A graft model from a HF folder or Hub id: the bare body (task "base") or body + head."""
    folder = resolve(model)
    family, cfg = load_config(folder)
    state, source = read_weights(folder)
    state = legacy_names(state)
    if cfg.pooler and not any(k.startswith("pooler") for k in family.weight_map(cfg).split_prefix(state)[0]):
        cfg.pooler = False  # saved from a task model built without the pooler

    body = Transformer(cfg)
    expected = {name: p.shape for name, p in body.state_dict().items()}
    body_state, rest = family.weight_map(cfg).to_graft(state, expected, str(source))
    body.load_state_dict(body_state, strict=True)

    task = task or task_from_architectures(cfg.hf_config, family)
    if task == "base":
        result: Model = body
    else:
        if task not in HEADS:
            raise GraftError(f"unknown task {task!r} (known: base, {', '.join(HEADS)})")
        head = HEADS[task](body)
        head_state = {}
        for hf_name, name in head.hf_names().items():
            if hf_name not in rest:
                raise GraftError(f"{source}: missing tensor {hf_name!r} for the {task} head")
            head_state[name] = rest.pop(hf_name)
        head.load_state_dict(head_state, strict=False)
        result = TaskModel(body, head)
    if rest:
        log.warning(
            "%s: %d tensors not used by a %s %s model: %s",
            source,
            len(rest),
            family.name,
            task,
            ", ".join(sorted(rest)[:5]),
        )
    result.eval()
    if dtype is not None or device is not None:
        result.to(device=device, dtype=dtype)
    return result


def save_model(model: Model, folder: str | Path, tokenizer: Any = None) -> Path:
    """config.json + model.safetensors (+ tokenizer files): transformers' Auto classes load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = model.body if isinstance(model, TaskModel) else model
    cfg = body.config
    family = FAMILIES[cfg.family]
    task = model.task if isinstance(model, TaskModel) else "base"
    wmap = family.weight_map(cfg)
    state = wmap.to_hf(body.state_dict(), prefix=task != "base")
    if isinstance(model, TaskModel):
        head_state = model.head.state_dict()
        state.update({hf_name: head_state[name] for hf_name, name in model.head.hf_names().items()})
        extra = model.head.hf_config()
    else:
        extra = {}
    dtype = next(body.parameters()).dtype
    hf = {**cfg.hf_config, **family.config_to_hf(cfg), **extra}
    hf["architectures"] = [family.architectures[task]]
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_weights(state, folder)
    write_json(folder / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
