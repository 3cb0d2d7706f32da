"""Stage 5, crossval: k-fold cross-validation of ``crossval.method`` on the split's train + val pool.

Folds come from ``splits.json`` (grouped, leakage-safe). Each fold trains a fresh model with the
method's recipe overridden by ``crossval.recipe`` and is scored on its held-out fold with the weights of
its last epoch (no selection on the held-out fold); mean ± std over folds is reported. Each fold keeps a
resumable checkpoint.
"""

from __future__ import annotations

import logging

import pandas as pd

import mlflow

from polypflow.track import runs as tracking
from polypflow.settings.config import Params, Recipe
from polypflow.io import atomic_path, write_json
from polypflow.data.images import read_splits
from polypflow.settings.layout import method_layout
from polypflow.tasks.plan import fit_plan, plan_method
from polypflow.train.engine import FitResult
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def fold_keys(splits: dict, fold: int) -> tuple[list[str], list[str]]:
    assignment = splits["folds"]["assignment"]
    train = sorted(k for k, f in assignment.items() if f != fold)
    held_out = sorted(k for k, f in assignment.items() if f == fold)
    return train, held_out


def crossval_recipe(params: Params) -> Recipe:
    """The method's recipe with ``crossval.recipe`` over it; no early stop (nothing to select on)."""
    return params.recipe(params.crossval.method, params.crossval.recipe).model_copy(update={"early_stop_patience": 10**6})


def fit_fold(params: Params, fold: int, resume: bool = True, on_epoch=None) -> tuple[FitResult, int, int]:
    """Train fold ``fold`` to its checkpoint (what the flows' fan-out runs, ``--fold``); the stage then
    resumes the finished checkpoint. Returns the fit and the train / held-out sizes."""
    method, recipe, splits = params.crossval.method, crossval_recipe(params), read_splits(params)
    if not 0 <= fold < splits["folds"]["k"]:
        raise ValueError(f"fold {fold} does not exist: {params.paths.splits} has {splits['folds']['k']} folds")
    plan = plan_method(params, method, *fold_keys(splits, fold), recipe, seed_offset=fold)
    ckpt = method_layout(params, method).crossval_checkpoints / f"fold{fold}.pt"
    _, result = fit_plan(params, plan, ckpt, resume, on_epoch)
    return result, len(plan.train_keys), len(plan.val_keys)


def run(params: Params, resume: bool = True) -> dict:
    """Train and score every fold; write ``folds.csv`` and ``summary.json``."""
    method, recipe = params.crossval.method, crossval_recipe(params)
    k = read_splits(params)["folds"]["k"]
    rows = []
    with tracking.stage_run(params, "crossval", method) as parent:
        mlflow.log_params(tracking.flat("", {"method": method, "folds": k, "recipe": recipe.model_dump()}))
        for fold in range(k):
            with tracking.stage_run(params, "crossval", method, parent_run_id=parent.info.run_id,
                                    run_name=f"crossval-{method}-fold{fold}"):
                epochs = tracking.EpochLogger()
                result, n_train, n_held_out = fit_fold(params, fold, resume, epochs)
                epochs.backfill(result.history)
                row = {"fold": fold, "n_train": n_train, "n_held_out": n_held_out,
                       "dice": result.history[-1]["val_dice"], "dice_best_epoch": result.best_score}
                mlflow.log_metrics({"fold_dice": row["dice"]})
            rows.append(row)
            log.info("fold %d/%d: Dice %.4f", fold + 1, k, row["dice"])
        folds = pd.DataFrame(rows)
        dice = folds["dice"].to_numpy()
        summary = {"method": method, "k": k, "dice_mean": float(dice.mean()), "dice_std": float(dice.std(ddof=1)),
                   "folds": folds["dice"].round(6).tolist()}
        mlflow.log_metrics({"cv_dice_mean": summary["dice_mean"], "cv_dice_std": summary["dice_std"]})
    files = method_layout(params, method)
    with atomic_path(files.crossval_folds, suffix=".csv") as tmp:
        folds.to_csv(tmp, index=False)
    write_json(files.crossval_summary, summary)
    log.info("%s %d-fold CV Dice %.4f ± %.4f", method, k, summary["dice_mean"], summary["dice_std"])
    return summary


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--fold", type=int, help="only train this fold's checkpoint (no MLflow, no outputs): what the "
                                            "flows' fan-out runs; the stage then scores the finished folds")
    args = p.parse_args()
    if args.fold is None:
        main(lambda: run(project_params(args.params), resume=not args.no_resume))
    else:
        main(lambda: fit_fold(project_params(args.params), args.fold, resume=not args.no_resume))
