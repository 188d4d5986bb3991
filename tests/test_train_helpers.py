"""A tiny body + head + data for training tests, independent of the task heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn import Transformer, TransformerConfig
from graft.tasks.base import Head, TaskModel
from graft.train.config import Recipe, build


class TokenHead(Head):
    """Per-token classes: the loss is a mean over non-ignored tokens, so counts vary by batch."""

    task = "token-classification"  # saved as BertForTokenClassification

    def __init__(self, body: Transformer, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(body.config.hidden_size, classes)

    def forward(self, out, batch):
        return self.proj(out.last_hidden_state)  # (B, T, C)

    def loss(self, logits, labels, batch):
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )

    def count(self, labels, batch):
        return int((labels != -100).sum())

    def hf_names(self):
        return {"classifier.weight": "proj.weight", "classifier.bias": "proj.bias"}


def tiny_model(seed: int = 0, dropout: float = 0.0) -> TaskModel:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        family="bert", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
        max_positions=32, dropout=dropout, attention_dropout=dropout, embedding_norm=True, norm_eps=1e-12,
    )  # fmt: skip
    body = Transformer(cfg)
    return TaskModel(body, TokenHead(body))


def tiny_data(n: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, 50, (length,), generator=g).tolist()
        labels = [i % 3 for i in ids]
        for j in torch.randint(0, length, (2,), generator=g).tolist():  # some ignored tokens
            labels[j] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_recipe(out, **sections) -> Recipe:
    data = {
        "model": {"path": "tiny"},
        "train": {"output": str(out), "batch_size": 8, "epochs": 1, "clip_norm": 1.0, "plots": False},
        "optim": {"lr": 1e-2},
        "eval": {"every": 0, "batch_size": 16},
        "checkpoint": {"every": 0, "keep": 2, "save_model": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return build(Recipe, data, "test recipe").check()


def run(out: str, kill_at: int = 0, resume: bool = False, dropout: float = 0.1) -> None:
    """A 2-epoch run with dropout, checkpoints every 3 steps; SIGKILLs itself after step ``kill_at``."""
    import os
    import signal

    from graft.train import Trainer

    def killer(trainer, out):
        if trainer.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model = tiny_model(dropout=dropout)
    recipe = tiny_recipe(
        out, train={"epochs": 2, "batch_size": 4, "accumulate": 2}, optim={"lr": 1e-2},
        eval={"every": 2}, checkpoint={"every": 3, "keep": 2},
    )  # fmt: skip
    data = tiny_data(40)
    Trainer(model, recipe, data, collate, data[:8], callbacks=[killer] if kill_at else [], quiet=True).fit(
        resume
    )


def run_distributed(out: str, mode: str, stop_at: int = 0, resume: bool = False) -> None:
    """5 steps of 8 examples, whatever the number of processes (torchrun sets WORLD_SIZE).

    Embeddings are frozen and gradient checkpointing is on: both must work under DDP and FSDP.
    ``stop_at``: every process exits right after that step's checkpoint.
    """
    import os

    from graft.train import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))

    def stop(trainer, out):
        if trainer.state.global_step == stop_at:
            os._exit(0)

    model = tiny_model()
    model.body.embed.requires_grad_(False)
    recipe = tiny_recipe(
        out, train={"epochs": 1, "batch_size": 8 // world // 2, "accumulate": 2, "gradient_checkpointing": True},
        optim={"name": "sgd", "lr": 0.1}, schedule={"warmup_steps": 2},
        checkpoint={"every": 1, "keep": 10, "save_model": True}, distributed={"mode": mode},
    )  # fmt: skip
    Trainer(model, recipe, tiny_data(40), collate, callbacks=[stop] if stop_at else [], quiet=True).fit(
        resume
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "dist":
        run_distributed(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:] == ["--resume"])
    else:
        run(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["--resume"])
