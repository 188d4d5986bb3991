"""``graft compress --plan``: the text of a compression plan, read into steps.

A plan is a comma-separated list of steps; a step's options follow its name after a colon, and
an item with ``=`` but no colon is one more option of the step before it:

    fp32,bf16,int8-dynamic,int8-weight,distill:layers=3,prune:heads=0.33,ffn=0.25

Steps: ``fp32`` (the model as given), the quantization methods of graft.kernels.int8 (bf16,
int8-dynamic, int8-weight), ``distill`` (a student keeping ``layers`` of the teacher's layers,
evenly spread as DistilBERT kept every other one, trained against the teacher) and ``prune``
(``heads`` and ``ffn``: the fractions of all heads and feed-forward neurons removed; ``scope``:
global, ranked across blocks, or layer, the same share of each block; then a recovery distilled
from the unpruned model). Training steps take ``steps`` and ``lr`` too, which
default to graft compress's --steps and --lr. Every mistake is one line naming the step and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graft.compress.prune import check_scope
from graft.errors import GraftError, coerce, did_you_mean
from graft.kernels.int8 import METHODS

# step -> {key: type}; a training step's steps/lr default to the command's flags
KEYS: dict[str, dict[str, type]] = {
    "fp32": {},
    **{method: {} for method in METHODS},
    "distill": {"layers": int, "steps": int, "lr": float},
    "prune": {"heads": float, "ffn": float, "scope": str, "steps": int, "lr": float},
}
TRAINED = ("distill", "prune")


@dataclass
class Step:
    """One variant of the plan: ``kind`` (a key of KEYS) and its options, as written in ``text``."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The step as a plan writes it (the row's name in the report)."""
        given = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{given}" if given else self.kind

    @property
    def slug(self) -> str:
        """A folder name for the step's model: distill-layers3, prune-heads0.33-ffn0.25."""
        return "-".join([self.kind, *(f"{k}{v}" for k, v in self.options.items())])

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED


def parse_plan(text: str) -> list[Step]:
    """The steps of ``text``, in order; a GraftError "--plan: ..." for the first thing wrong."""
    steps: list[Step] = []
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise GraftError("--plan: empty; give comma-separated steps, e.g. fp32,int8-dynamic,distill:layers=3")
    for item in items:
        if not item:
            raise GraftError(f"--plan {text!r}: an empty step (two commas in a row, or one at an end)")
        name, colon, option = item.partition(":")
        if not colon and "=" in item:  # one more option of the step before
            if not steps:
                raise GraftError(f"--plan: option {item!r} comes before any step")
            add_option(steps[-1], item)
            continue
        name = name.strip()
        if name not in KEYS:
            raise GraftError(
                f"--plan: unknown step {name!r} (known: {', '.join(KEYS)}){did_you_mean(name, KEYS)}"
            )
        steps.append(Step(name))
        if colon:
            add_option(steps[-1], option.strip())
    for step in steps:
        check_step(step)
    texts = [s.text for s in steps]
    twice = next((t for i, t in enumerate(texts) if t in texts[:i]), None)
    if twice is not None:
        raise GraftError(f"--plan: step {twice!r} appears twice")
    return steps


def add_option(step: Step, item: str) -> None:
    keys = KEYS[step.kind]
    key, eq, value = (part.strip() for part in item.partition("="))
    if not keys:
        raise GraftError(f"--plan: step {step.kind!r} takes no options (got {item!r})")
    if not eq or not key or not value:
        raise GraftError(f"--plan: {step.kind}: expected KEY=VALUE, got {item!r}")
    if key not in keys:
        raise GraftError(
            f"--plan: {step.kind} has no key {key!r} (known: {', '.join(keys)}){did_you_mean(key, keys)}"
        )
    if key in step.options:
        raise GraftError(f"--plan: {step.kind}:{key} is given twice")
    step.options[key] = coerce(value, keys[key], f"--plan: {step.kind}:{key}")


def check_step(step: Step) -> None:
    """The bounds of each option (its type is checked as it is read)."""
    o = step.options
    where = f"--plan: {step.kind}"
    if step.kind == "distill" and "layers" not in o:
        raise GraftError(f"{where} needs layers=N, the student's number of layers (e.g. distill:layers=3)")
    if step.kind == "prune" and not (o.get("heads") or o.get("ffn")):
        raise GraftError(f"{where} needs heads=FRACTION and/or ffn=FRACTION (e.g. prune:heads=0.33,ffn=0.25)")
    for key in ("heads", "ffn"):
        if key in o and not 0.0 <= o[key] < 1.0:
            raise GraftError(f"{where}:{key}={o[key]}: expected a fraction from 0 to below 1")
    if "scope" in o:
        check_scope(o["scope"], f"{where}:scope=")
    for key in ("layers", "steps"):
        if key in o and o[key] < (1 if key == "layers" else 0):
            raise GraftError(
                f"{where}:{key}={o[key]}: expected a whole number of at least {1 if key == 'layers' else 0}"
            )
    if "lr" in o and not o["lr"] > 0:
        raise GraftError(f"{where}:lr={o['lr']}: expected a learning rate above 0")
