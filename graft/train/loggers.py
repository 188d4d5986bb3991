"""What a run leaves behind: metrics.jsonl, TensorBoard logs (when installed), PNG plots, and a
live progress bar on a terminal."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from graft.io.atomic import write_text


class MetricsLog:
    """One JSON object per line: training steps ({"step", "loss", "lr", ...}) and evaluations ({"eval/...": ...})."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def truncate(self, step: int) -> None:
        """Forget lines after ``step`` (written by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.read_lines() if line.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def read_lines(self) -> list[dict[str, Any]]:
        lines = []
        for text in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
        return lines

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(metrics_file: Path, folder: Path) -> list[Path]:
    """loss.png, lr.png and eval.png from metrics.jsonl (matplotlib, imported only here).

    Without matplotlib (an optional dependency) the run still ends normally, with a warning.
    """
    try:
        import matplotlib
    except ImportError:
        logging.getLogger("graft").warning(
            "plots skipped: matplotlib is not installed (pip install matplotlib)"
        )
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(t) for t in metrics_file.read_text(encoding="utf-8").splitlines() if t.strip()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if any(k.startswith("eval/") for k in r)]
    written = []

    def figure(name: str, series: dict[str, tuple[list, list]], ylabel: str, log: bool = False) -> None:
        series = {k: v for k, v in series.items() if v[0]}
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log and all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    def xy(records: list[dict], key: str) -> tuple[list, list]:
        pts = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    figure("loss", {"train": xy(train, "loss"), "eval": xy(evals, "eval/loss")}, "loss", log=True)
    figure("lr", {"lr": xy(train, "lr")}, "learning rate")
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/loss"})
    figure("eval", {k.removeprefix("eval/"): xy(evals, k) for k in keys}, "metric")
    return written


class Progress:
    """A rich progress bar with loss, learning rate, throughput and ETA; silent off a terminal."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, examples_per_s: float) -> None:
        if self.bar is not None:
            info = f"loss {loss:.4f}  lr {lr:.2e}  {examples_per_s:.1f} ex/s"
            self.bar.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def read_metrics(run: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl: training steps ("train") or evaluations ("eval")."""
    lines = (
        MetricsLog(Path(run), enabled=False).read_lines() if (Path(run) / "metrics.jsonl").exists() else []
    )
    if kind == "train":
        return [r for r in lines if "loss" in r]
    return [r for r in lines if any(k.startswith("eval/") for k in r)]
