"""Strategy-only checkpoints: what training changed, without the base model's weights.

    save_trained(model, "runs/bbc/trained")            # trained.safetensors + strategy.json
    model = load_trained("path/to/base", "runs/bbc/trained")

Any strategy works: the checkpoint holds the trainable parameters under graft's names (LoRA
and adapter weights, prefixes, biases for BitFit, the head...) and the strategy's spec; loading
builds the base model with the same head, applies the same strategy and fills those parameters
in. For LoRA, ``save_adapter`` writes PEFT's format instead.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from graft.errors import GraftError
from graft.io.atomic import atomic_path, write_json
from graft.tasks.base import TaskModel

WEIGHTS, META = "trained.safetensors", "strategy.json"


def save_trained(model: nn.Module, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    strategy = getattr(model, "strategy", None)
    if strategy is None:
        raise GraftError("save_trained: the model has no strategy (apply one with apply_strategy first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    meta = {"strategy": strategy.spec()}
    if isinstance(model, TaskModel):
        meta.update(task=model.task, head=model.head.hf_config())
    write_json(folder / META, meta)
    return folder
