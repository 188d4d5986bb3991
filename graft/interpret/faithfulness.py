"""Faithfulness (chapter 9): numbers that say which explanation to trust, not just pictures.

Tokens are taken out (replaced by the baseline token, so positions do not move) in the order an
attribution ranks them, and the explained number is watched:

- deletion curve: the score after removing the top-k tokens, k = 0..n; a faithful attribution
  makes it fall fast, so a *lower* area is better (Petsiuk et al. 2018, for images).
- insertion curve: the score of the baseline row with only the top-k tokens put back; a *higher*
  area is better.
- comprehensiveness: f(x) - f(x without its top q% tokens), averaged over q in BINS (higher is
  better); sufficiency: f(x) - f(only the top q% tokens), averaged (lower is better) (DeYoung
  et al. 2020, ERASER).

Areas are the trapezoid rule over k / n in [0, 1], so they are in the score's own units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from graft.interpret.subject import Subject

BINS = (0.01, 0.05, 0.1, 0.2, 0.5)


@dataclass
class Faithfulness:
    deletion: list[float]  # n + 1 scores: 0..n top tokens removed
    insertion: list[float]  # n + 1 scores: 0..n top tokens kept, the rest baseline
    deletion_area: float
    insertion_area: float
    comprehensiveness: float
    sufficiency: float

    def summary(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list)}


def area(curve: list[float]) -> float:
    """The trapezoid area under ``curve`` over [0, 1] (one point: that point)."""
    if len(curve) == 1:
        return curve[0]
    n = len(curve) - 1
    return sum((a + b) / 2 for a, b in zip(curve, curve[1:], strict=False)) / n


def ranking(subject: Subject, scores: list[float]) -> list[int]:
    """The free positions, highest attribution first (ties: left to right)."""
    return sorted(subject.free, key=lambda i: (-scores[i], i))


@torch.no_grad()
def curves(subject: Subject, scores: list[float], batch_size: int = 32) -> tuple[list[float], list[float]]:
    """(deletion, insertion) curves: the score with the top-k ranked tokens removed / kept, k = 0..n."""
    order = ranking(subject, scores)
    ids, base = subject.input_ids[0], subject.baseline_ids[0]  # (T,)
    deleted, inserted = [ids.clone()], [base.clone()]
    for i in order:
        d, s = deleted[-1].clone(), inserted[-1].clone()
        d[i], s[i] = subject.baseline_id, ids[i]
        deleted.append(d)
        inserted.append(s)
    rows = torch.stack(deleted + inserted)  # (2 (n + 1), T)
    values = torch.cat([subject.scores(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)])
    values = values.tolist()
    return values[: len(deleted)], values[len(deleted) :]


def faithfulness(subject: Subject, scores: list[float]) -> Faithfulness:
    """Deletion and insertion curves (with their areas), comprehensiveness and sufficiency."""
    deletion, insertion = curves(subject, scores)
    n, full = len(deletion) - 1, deletion[0]
    ks = [max(1, round(q * n)) for q in BINS] if n else [0]
    comprehensiveness = sum(full - deletion[k] for k in ks) / len(ks)
    sufficiency = sum(full - insertion[k] for k in ks) / len(ks)
    return Faithfulness(deletion, insertion, area(deletion), area(insertion), comprehensiveness, sufficiency)
