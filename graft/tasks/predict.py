"""Run a task model over records: collate, forward, post-process, batch after batch.

The same loop serves ``graft predict``, ``graft eval`` and library users; what differs between
tasks lives in the head's collate / postprocess / evaluate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch

from graft.errors import GraftError
from graft.tasks.base import TaskModel
from graft.tasks.collate import to_device


def batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def prediction_row(record: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
    """What ``graft predict`` writes (one JSON line) and ``graft serve``'s /predict returns for a
    record: its id, when it has one, then the prediction."""
    row = {"id": record["id"]} if record.get("id") is not None else {}
    return {**row, **prediction}


@torch.inference_mode()
def predict(
    model: TaskModel,
    tokenizer: Any,
    records: Iterable[dict[str, Any]],
    batch_size: int = 32,
    max_length: int | None = None,
    **options: Any,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, prediction) pairs, in the order of ``records``; ``options`` go to the head's postprocess."""
    if not isinstance(model, TaskModel):
        raise GraftError("predict: the model has no task head (it is a bare transformer); load a task model")
    device = next(model.parameters()).device
    model.eval()
    for chunk in batches(records, batch_size):
        batch = model.head.collate(chunk, tokenizer, max_length)
        logits = model(**to_device(batch, device)).logits
        yield from zip(chunk, model.head.postprocess(logits, batch, **options), strict=True)
