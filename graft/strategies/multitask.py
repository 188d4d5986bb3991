"""Multitask learning (chapter 4): one body, one head per task, batches drawn task by task.

    model = MultitaskModel(body, {"topic": ClassificationHead(body, 5), "sentiment": ClassificationHead(body, 2)})
    loader = MultitaskLoader({"topic": topic_batches, "sentiment": sentiment_batches}, temperature=2.0)
    for batch in loader:              # each batch carries batch["task"]
        model(**batch).loss.backward()

Task i is drawn with probability proportional to n_i ** (1 / temperature): temperature 1 is
proportional to dataset size, larger temperatures move towards uniform, so small tasks are not
drowned out (the T5 / mT5 recipe).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

from torch import nn

from graft.errors import GraftError
from graft.nn import Transformer
from graft.tasks.base import Head, TaskOutput, body_inputs


class MultitaskModel(nn.Module):
    """A shared body and a head per task; ``model(task=name, **batch)`` runs that task's head."""

    def __init__(self, body: Transformer, heads: Mapping[str, Head]) -> None:
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def config(self):
        return self.body.config

    def forward(self, **batch: Any) -> TaskOutput:
        task = batch.get("task")
        if task not in self.heads:
            raise GraftError(f"multitask: batch task {task!r} is not one of {', '.join(self.heads)}")
        head = self.heads[task]
        out = self.body(**body_inputs(head, batch))
        logits = head(out, batch)
        labels = batch.get("labels")
        loss = head.loss(logits, labels, batch) if labels is not None else None
        return TaskOutput(logits, loss, out)


def task_probabilities(sizes: Mapping[str, int], temperature: float = 1.0) -> dict[str, float]:
    """p_i proportional to n_i ** (1 / temperature)."""
    if temperature <= 0:
        raise GraftError(f"multitask: temperature must be positive, got {temperature}")
    weights = {task: n ** (1.0 / temperature) for task, n in sizes.items()}
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


class MultitaskLoader:
    """Batches from several tasks, each tagged with ``batch["task"]``, the task drawn at random per step.

    One pass yields ``steps`` batches (default: the total number of batches of all tasks);
    a task's batches restart when they run out.
    """

    def __init__(
        self,
        loaders: Mapping[str, Iterable[dict[str, Any]]],
        temperature: float = 1.0,
        steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if not loaders:
            raise GraftError("multitask: no tasks given")
        self.loaders = dict(loaders)
        sizes = {t: len(loader) if isinstance(loader, Sized) else 1 for t, loader in self.loaders.items()}
        self.probabilities = task_probabilities(sizes, temperature)
        self.steps = steps if steps is not None else sum(sizes.values())
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        tasks = list(self.probabilities)
        weights = [self.probabilities[t] for t in tasks]
        iterators = {t: iter(self.loaders[t]) for t in tasks}
        for _ in range(self.steps):
            task = self.rng.choices(tasks, weights)[0]
            try:
                batch = next(iterators[task])
            except StopIteration:
                iterators[task] = iter(self.loaders[task])
                batch = next(iterators[task])
            yield {**batch, "task": task}
