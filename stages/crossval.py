"""Stage 5, crossval: k-fold cross-validation of ``crossval.method`` on the split's train + val pool.

Folds come from ``splits.json`` (grouped, leakage-safe). Each fold trains a fresh model with the
method's recipe overridden by ``crossval.recipe`` and is scored on its held-out fold with the weights of
its last epoch (no selection on the held-out fold); mean ± std over folds is reported. Each fold keeps a
resumable checkpoint.
"""

from __future__ import annotations

import logging

import pandas as pd

from polypflow import tracking
from polypflow.config import Params, load_params
from polypflow.io import atomic_path, write_json
from polypflow.pipeline import checkpoint_dir, read_splits, stage_dir
from stages._cli import main, parser
from stages.train import subsample, train_method

log = logging.getLogger(__name__)


def fold_keys(splits: dict, fold: int) -> tuple[list[str], list[str]]:
    assignment = splits["folds"]["assignment"]
    train = sorted(k for k, f in assignment.items() if f != fold)
    held_out = sorted(k for k, f in assignment.items() if f == fold)
    return train, held_out


def run(params: Params, resume: bool = True) -> dict:
    """Train and score every fold; write ``folds.csv`` and ``summary.json``."""
    import mlflow

    method = params.crossval.method
    recipe = params.recipe(method, params.crossval.recipe).model_copy(update={"early_stop_patience": 10**6})
    splits = read_splits(params)
    k = splits["folds"]["k"]
    rows = []
    with tracking.stage_run(params, "crossval", method) as parent:
        mlflow.log_params(tracking.flat("", {"method": method, "folds": k, "recipe": recipe.model_dump()}))
        for fold in range(k):
            train_keys, held_out = fold_keys(splits, fold)
            train_keys = subsample(train_keys, recipe.max_train_items, params.seed + fold)
            with tracking.stage_run(params, "crossval", method, parent_run_id=parent.info.run_id,
                                    run_name=f"crossval-{method}-fold{fold}"):
                log_epoch = lambda epoch, m: mlflow.log_metrics(m, step=epoch)  # noqa: E731
                ckpt = checkpoint_dir(params, f"crossval-{method}") / f"fold{fold}.pt"
                _, result = train_method(params, method, train_keys, held_out, recipe, ckpt, resume, log_epoch)
                row = {"fold": fold, "n_train": len(train_keys), "n_held_out": len(held_out),
                       "dice": result.history[-1]["val_dice"], "dice_best_epoch": result.best_val_dice}
                mlflow.log_metrics({"fold_dice": row["dice"]})
            rows.append(row)
            log.info("fold %d/%d: Dice %.4f", fold + 1, k, row["dice"])
        folds = pd.DataFrame(rows)
        dice = folds["dice"].to_numpy()
        summary = {"method": method, "k": k, "dice_mean": float(dice.mean()), "dice_std": float(dice.std(ddof=1)),
                   "folds": folds["dice"].round(6).tolist()}
        mlflow.log_metrics({"cv_dice_mean": summary["dice_mean"], "cv_dice_std": summary["dice_std"]})
    out = stage_dir(params, "crossval", method)
    with atomic_path(out / "folds.csv", suffix=".csv") as tmp:
        folds.to_csv(tmp, index=False)
    write_json(out / "summary.json", summary)
    log.info("%s %d-fold CV Dice %.4f ± %.4f", method, k, summary["dice_mean"], summary["dice_std"])
    return summary


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args()
    main(lambda: run(load_params(args.params), resume=not args.no_resume))
