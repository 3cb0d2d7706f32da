"""Stage 4, train@<method>: train one configured method on the split's train set, select on val.

Writes ``artifacts/models/<method>/`` (model.pt, metrics.json, history.csv, val_per_image.csv, run.json) and
keeps a resumable per-epoch checkpoint in ``artifacts/checkpoints/<method>/`` (scratch, not a DVC output). Its
MLflow run logs params, the datasets it trained and validated on, per-epoch metrics and the served model; the
model is registered later, by ``register@<method>``, once it has been evaluated, exported and profiled.
"""

from __future__ import annotations

import argparse
import logging

import mlflow
import pandas as pd
import torch

from polypflow.data.images import NORMALIZATION, load_image_set, read_facts, read_splits
from polypflow.deploy.serving import log_model
from polypflow.evaluate.stability import sequences_of
from polypflow.infer.device import resolve_device
from polypflow.infer.predictor import SizeLimits
from polypflow.io import write_csv, write_json
from polypflow.settings.config import Params
from polypflow.settings.layout import method_layout
from polypflow.tasks.plan import MethodPlan, fit_plan, plan_method
from polypflow.track import runs as tracking
from polypflow.train.checkpoint import save_trained
from polypflow.train.engine import FitResult
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def training_plan(params: Params, method: str) -> MethodPlan:
    """``method`` on the split's train set (subsampled to the recipe's limit), selected on its val set."""
    splits = read_splits(params)
    return plan_method(params, method, splits["train"], splits["val"])


def fit_checkpoint(params: Params, method: str, resume: bool = True, on_epoch=None) -> tuple[torch.nn.Module, FitResult]:
    """Fit ``method`` to its checkpoint in ``artifacts/checkpoints/<method>/``, nothing else: the part of the
    stage a flow fans out (``--fit-only``); the stage itself then resumes the finished checkpoint."""
    return fit_plan(params, training_plan(params, method), method_layout(params, method).checkpoint, resume, on_epoch)


def validation(params: Params, model: torch.nn.Module, plan: MethodPlan,
               threshold: float) -> tuple[pd.DataFrame, dict, dict]:
    """What the task chooses on the validation images for the model to ship with (a segmenter's map temperature and
    the threshold moved with it, :meth:`~polypflow.tasks.base.Task.calibrate`, set on ``model``) and on the
    validation sequences for video (a segmenter's smoothing); each validation image's score at the shipped
    threshold (the task's: Dice, a detector's box F1), for promotion."""
    facts, device = read_facts(params), resolve_device(params.device)
    val = load_image_set(facts, plan.val_keys, plan.recipe.image_size, params.validate_.mask_threshold, params.paths.cache)
    calibration = {"threshold": threshold, **plan.task.calibrate(model, val, threshold, device)}
    threshold = calibration["threshold"]
    scores = plan.task.val_scores(model, val, threshold, device)
    sequences = list(sequences_of(facts, val.keys, params.video_datasets()).values())
    video = plan.task.video_meta(model, val, sequences, threshold, device)
    per_image = pd.DataFrame({"key": pd.Series(plan.val_keys, dtype=str), plan.task.val_score: pd.Series(scores, dtype=float)})
    return per_image, calibration, video


def run(params: Params, method: str, resume: bool = True) -> dict:
    """Train ``method``; write its model directory and return its metrics."""
    plan, files = training_plan(params, method), method_layout(params, method)
    task, recipe = plan.task, plan.recipe
    with tracking.stage_run(params, "train", method) as run:
        mlflow.log_params(tracking.flat("", {"method": method, "arch": plan.arch, "model": plan.kwargs,
                                              "recipe": recipe.model_dump(), "seed": params.seed,
                                              "split.scheme": read_splits(params)["scheme"],
                                              "n_train": len(plan.train_keys), "n_val": len(plan.val_keys)}))
        tracking.log_image_sets(params, {"training": plan.train_keys, "validation": plan.val_keys})
        epochs = tracking.EpochLogger()
        model, result = fit_plan(params, plan, files.checkpoint, resume, epochs)
        epochs.backfill(result.history)
        if isinstance(getattr(model, "threshold", None), torch.Tensor):
            model.threshold.fill_(result.threshold)
        val_scores, calibration, video = validation(params, model, plan, result.threshold)
        threshold, shipped = calibration.pop("threshold"), calibration.pop("val_meandic", {})
        mean, std = NORMALIZATION[recipe.normalize]
        meta = {"method": method, "arch": plan.arch, "task": task.name, "model_kwargs": plan.kwargs,
                "image_size": recipe.image_size, "normalize": recipe.normalize, "mean": list(mean), "std": list(std),
                "threshold": threshold, task.metric: result.best_score, "best_epoch": result.best_epoch,
                **task.meta(), **calibration, **video}
        history = pd.DataFrame([{**row, "val_score": task.select(row) if task.metric in row else None}
                                for row in result.history])  # epochs before recipe.validate_from: not validated
        candidates = {f"val_meandic_t{t}": score for t, score in shipped.items()}
        metrics = {task.metric: result.best_score, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "threshold": threshold, "image_size": recipe.image_size, **calibration, **candidates}
        mlflow.log_metrics({f"best_{task.metric}": result.best_score, "threshold": threshold, **calibration, **candidates,
                            **{f"smoothing.{k}": v for k, v in video.get("smoothing", {}).items() if not isinstance(v, str)}})
        mlflow.log_text(history.to_csv(index=False), "history.csv")
        mlflow.log_text(val_scores.to_csv(index=False), tracking.VAL_SCORES_ARTIFACT)
        info = log_model(model.cpu(), meta, SizeLimits(params.validate_.min_side, params.validate_.max_side))
    # local outputs only once MLflow holds the model: a failed upload leaves the previous outputs consistent
    save_trained(files.model, model, **meta)
    write_csv(files.val_scores, val_scores)
    write_csv(files.history, history)
    write_json(files.metrics, metrics)
    write_json(files.run_record("train"), {"run_id": run.info.run_id, "model_uri": info.model_uri})
    log.info("%s: best %s %.4f at epoch %d", method, task.metric, result.best_score, result.best_epoch)
    return metrics


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--method", required=True, help="a key of methods: in params.yaml")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the last checkpoint of the same settings (default); --no-resume starts afresh")
    p.add_argument("--fit-only", action="store_true",
                   help="only train the checkpoint (no MLflow, no outputs): what the flows' fan-out runs")
    args = p.parse_args()
    stage = fit_checkpoint if args.fit_only else run
    main(lambda: stage(project_params(args.params), args.method, resume=args.resume))
