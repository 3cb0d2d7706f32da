"""Optional stage lr_search@<method>: Optuna learning-rate search, as the CRIS paper tunes its models.

Off by default (``lr_search.methods: []``). For each listed method: ``lr_search.trials`` trials (TPE,
seeded) over a log-uniform range, each training with the method's recipe overridden by
``lr_search.recipe`` and reporting validation Dice per epoch to a median pruner. Writes ``trials.csv`` and
``best.json``; put the best rate into ``methods.<method>.recipe.lr`` to use it.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path


import mlflow
import optuna

from polypflow.track import runs as tracking
from polypflow.settings.config import Params
from polypflow.io import atomic_path, write_json
from polypflow.data.images import read_splits
from polypflow.settings.layout import method_layout
from polypflow.tasks.plan import fit_plan, plan_method
from stages._cli import method_main

log = logging.getLogger(__name__)


def objective_factory(params: Params, method: str, parent_run_id: str, workdir: Path):
    """An Optuna objective: train with the trial's learning rate, return the best validation Dice."""
    cfg = params.lr_search
    splits = read_splits(params)
    base = plan_method(params, method, splits["train"], splits["val"], params.recipe(method, cfg.recipe))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", cfg.lr_low, cfg.lr_high, log=True)
        plan = dataclasses.replace(base, recipe=base.recipe.model_copy(update={"lr": lr}))

        def report(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)
            if "val_dice" not in metrics:  # an epoch before recipe.validate_from
                return
            trial.report(metrics["val_dice"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val Dice {metrics['val_dice']:.4f})")

        with tracking.stage_run(params, "lr_search", method, parent_run_id=parent_run_id,
                                run_name=f"lr_search-{method}-trial{trial.number}"):
            mlflow.log_param("lr", lr)
            _, result = fit_plan(params, plan, workdir / f"trial{trial.number}.pt", resume=False, on_epoch=report)
            return result.best_score

    return objective


def run(params: Params, method: str) -> dict:
    """Search the learning rate of ``method``; write the trials and the best value."""
    cfg = params.lr_search
    sampler = optuna.samplers.TPESampler(seed=params.seed)
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials))
    with tracking.stage_run(params, "lr_search", method) as parent, tempfile.TemporaryDirectory() as tmp:
        study.optimize(objective_factory(params, method, parent.info.run_id, Path(tmp)), n_trials=cfg.trials)
        best = {"method": method, "lr": study.best_params["lr"], "val_dice": study.best_value,
                "trials": len(study.trials),
                "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}
        mlflow.log_params({"best_lr": best["lr"], "trials": best["trials"]})
        mlflow.log_metric("best_val_dice", best["val_dice"])
    files = method_layout(params, method)
    trials = study.trials_dataframe(attrs=("number", "value", "params", "state"))
    with atomic_path(files.lr_trials, suffix=".csv") as path:
        trials.to_csv(path, index=False)
    write_json(files.lr_best, best)
    log.info("%s: best lr %.2e (val Dice %.4f) over %d trials, %d pruned", method, best["lr"], best["val_dice"],
             best["trials"], best["pruned"])
    return best


if __name__ == "__main__":
    method_main(__doc__, run)
