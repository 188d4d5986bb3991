"""Which examples go into which optimizer step: seeded, resumable, shardable.

An epoch's order is a pure function of (seed, epoch), so a resumed run needs only the
position (epoch, step) to continue exactly where it stopped. One optimizer step takes
``batch_size * accumulate * world_size`` examples; each process gets its share as
``accumulate`` micro-batches (the same split DistributedSampler would make, without padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class StepSampler:
    num_examples: int
    batch_size: int  # per micro-batch and process
    accumulate: int = 1
    seed: int = 0
    shuffle: bool = True
    lengths: Sequence[int] | None = None  # for length grouping and the curriculum
    group_by_length: bool = False
    curriculum_epochs: int = 0  # epochs whose examples come shortest first
    world_size: int = 1
    rank: int = 0
    drop_last: bool = False
    group_window: int = 50  # steps per window sorted by length when grouping

    @property
    def step_size(self) -> int:
        return self.batch_size * self.accumulate * self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """Every example index, in this epoch's order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_examples) if self.shuffle else np.arange(self.num_examples)
        if self.lengths is None:
            return order
        lengths = np.asarray(self.lengths)
        if epoch < self.curriculum_epochs:
            return order[np.argsort(lengths[order], kind="stable")]  # short to long; ties stay shuffled
        if self.group_by_length:
            # Sort windows of many steps longest first, cut them into steps, shuffle the steps:
            # each step holds examples of similar length, and step order stays random.
            window = self.step_size * self.group_window
            parts = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
            steps = [order[i : i + self.step_size] for i in range(0, len(order), self.step_size)]
            full = [s for s in steps if len(s) == self.step_size]
            rest = [s for s in steps if len(s) < self.step_size]
            full = [full[i] for i in rng.permutation(len(full))]
            return np.concatenate(full + rest) if full or rest else order
        return order

    def steps(self, epoch: int) -> list[np.ndarray]:
        order = self.order(epoch)
        steps = [order[i : i + self.step_size] for i in range(0, len(order), self.step_size)]
        if steps and len(steps[-1]) < self.step_size and (self.drop_last or len(steps[-1]) < self.world_size):
            steps.pop()
        return steps

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        n = self.num_examples
        full, rest = divmod(n, self.step_size)
        return full + (1 if rest and not self.drop_last and rest >= self.world_size else 0)

    def micro_batches(self, step: np.ndarray) -> list[np.ndarray]:
        """This process's micro-batches of one step: every process gets the same number."""
        if self.lengths is not None and self.group_by_length:
            step = step[np.argsort(-np.asarray(self.lengths)[step], kind="stable")]
        share = np.array_split(step, self.world_size)[self.rank]
        smallest = len(step) // self.world_size
        count = min(self.accumulate, math.ceil(smallest / self.batch_size))
        if len(step) == self.step_size:
            return [share[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.accumulate)]
        return [m for m in np.array_split(share, count)]

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(step index in the epoch, this process's micro-batches) from step ``start`` on."""
        steps = self.steps(epoch)
        for i in range(start, len(steps)):
            yield i, self.micro_batches(steps[i])
