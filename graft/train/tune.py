"""Hyperparameter search (chapter 7) with Optuna: the space lives in the recipe's ``tune`` section.

    tune:
      trials: 20
      metric: accuracy            # default: eval.metric
      space:
        optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
        train.batch_size: {type: categorical, choices: [16, 32]}
        schedule.warmup_ratio: {type: float, low: 0.0, high: 0.2}

Each trial is a full run in ``train.output/trial-NNN``; its evaluations are reported to Optuna,
which prunes trials that fall behind the median of earlier ones at the same step.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from graft.errors import GraftError
from graft.io.atomic import atomic_path, write_json, write_text
from graft.train.config import Recipe, check_space, dump_recipe, with_overrides
from graft.train.loop import better_mode


def import_optuna() -> Any:
    try:
        import optuna
    except ModuleNotFoundError:
        raise GraftError(
            'graft tune needs optuna, which is not installed: pip install "graft-ml[train]"'
        ) from None
    return optuna


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        kind = spec.get("type", "float")
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif kind == "int":
            values[key] = trial.suggest_int(
                key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False))
            )
        else:
            values[key] = trial.suggest_float(
                key,
                float(spec["low"]),
                float(spec["high"]),
                log=bool(spec.get("log", False)),
                step=spec.get("step"),
            )
    return values


def run_search(
    recipe: Recipe, trials: int | None = None, quiet: bool = False, run=None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the search; write results.csv, results.json and best.yaml to train.output; return the best trial.

    ``run(recipe, callbacks) -> result`` trains one trial (default: the recipe's full run). A
    folder that holds an earlier search is refused, or with ``overwrite`` its trials are replaced.
    """
    optuna = import_optuna()
    from graft.train.build import run_recipe

    cfg = recipe.tune
    if not cfg.space:
        raise GraftError(
            "tune.space: empty; give at least one key, e.g. optim.lr: {type: float, low: 1e-5, high: 1e-3}"
        )
    check_space(cfg.space)
    metric = cfg.metric or recipe.eval.metric
    direction = cfg.direction
    if direction == "auto":
        direction = "minimize" if better_mode(metric, "auto") == "min" else "maximize"
    base = Path(recipe.train.output)
    earlier = sorted(base.glob("trial-[0-9][0-9][0-9]")) if base.is_dir() else []
    if earlier and not overwrite:
        raise GraftError(
            f"{base}: holds an earlier search ({len(earlier)} trial folders); pass --overwrite to replace "
            "it, or set train.output to a new folder"
        )
    for (
        folder
    ) in earlier:  # --overwrite: no trial of the earlier search is left to be mistaken for this one's
        shutil.rmtree(folder)
    run = run or (lambda r, callbacks: run_recipe(r, quiet=True, callbacks=callbacks, overwrite=overwrite))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2)
        if cfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        direction=direction, sampler=optuna.samplers.TPESampler(seed=recipe.train.seed), pruner=pruner
    )

    def objective(trial: Any) -> float:
        values = suggest(trial, cfg.space)
        trial_recipe = with_overrides(
            recipe, {**values, "train.output": str(base / f"trial-{trial.number:03d}")}
        )

        def report(trainer, out) -> None:
            s = trainer.state
            if s.last_eval_step == s.global_step and metric in s.last_metrics:
                trial.report(s.last_metrics[metric], s.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        result = run(trial_recipe, [report])
        value = result.get("best_metric") if metric == recipe.eval.metric else None
        value = value if value is not None else result.get(f"eval/{metric}")
        if value is None:
            raise GraftError(f"tune.metric: {metric!r} was never computed (is there validation data?)")
        if not quiet:
            print(f"trial {trial.number}: {metric} {value:.4f}  {values}", flush=True)
        return float(value)

    study.optimize(objective, n_trials=trials or cfg.trials, catch=())
    rows = [
        {"trial": t.number, "state": t.state.name.lower(), metric: t.value, **t.params} for t in study.trials
    ]
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        raise GraftError("tune: no trial finished (all pruned or failed)")
    best = study.best_trial
    best_recipe = with_overrides(
        recipe, {**best.params, "train.output": str(base / f"trial-{best.number:03d}")}
    )
    base.mkdir(parents=True, exist_ok=True)
    with atomic_path(base / "results.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)
    summary = {"metric": metric, "direction": direction, "best_trial": best.number, "best_value": best.value,
               "best_params": best.params, "trials": rows}  # fmt: skip
    write_json(base / "results.json", summary)
    write_text(base / "best.yaml", dump_recipe(best_recipe))
    print_table(rows, metric, best.number)
    print(f"best: trial {best.number}, {metric} {best.value:.4f}; config in {base / 'best.yaml'}")
    return summary


def print_table(rows: list[dict[str, Any]], metric: str, best: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hyperparameter search")
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column, justify="right" if column != "state" else "left")
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        table.add_row(*cells, style="bold green" if row["trial"] == best else None)
    Console().print(table)
