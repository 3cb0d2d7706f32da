"""Stage 4, train@<method>: train one configured method on the split's train set, select on val.

Writes ``artifacts/models/<method>/`` (model.pt, metrics.json, history.csv, val_per_image.csv, run.json) and
keeps a resumable per-epoch checkpoint in ``artifacts/checkpoints/<method>/`` (a persistent DVC output). Its
MLflow run logs params, the datasets it trained and validated on, per-epoch metrics and the model; the model is
registered later, by ``register@<method>``, once it has been evaluated, exported and profiled.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd
import torch

from polypflow import tracking
from polypflow.config import Params, Validate
from polypflow.data import NORMALIZATION, load_image_set
from polypflow.inference import SizeLimits
from polypflow.io import atomic_path, write_json
from polypflow.layout import method_layout, read_facts, read_splits
from polypflow.metrics import dice_batch
from polypflow.training import (FitResult, MethodPlan, fit_plan, plan_method, predict_probs, resolve_device,
                                plan_task, save_trained, training_min_area)
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def val_per_image(params: Params, model: torch.nn.Module, plan: MethodPlan, threshold: float) -> pd.Series:
    """Each validation image's score, indexed by key, for promotion: a segmenter's Dice at its ``threshold``, a
    detector's box F1 counting boxes from score ``threshold``."""
    keys = plan.val_keys
    data = load_image_set(read_facts(params), keys, plan.recipe.image_size, params.validate_.mask_threshold,
                          params.paths.cache)
    device = resolve_device(params.device)
    if not len(keys):
        scores = []
    elif plan.task == "detection":
        from polypflow.detection.data import image_boxes
        from polypflow.detection.evaluate import per_image_scores
        from polypflow.detection.training import predict_boxes

        cfg = params.detection
        found = predict_boxes(model, data.images, plan.recipe.normalize, device, score_threshold=cfg.score_threshold,
                              nms_iou=cfg.nms_iou, max_detections=cfg.max_detections)
        truth = image_boxes(data.masks, training_min_area(params, plan.recipe.image_size))
        scores = per_image_scores(keys, found, truth, threshold)["f1"].to_numpy()
    else:
        scores = dice_batch(predict_probs(model, data.images, plan.recipe.normalize, device), data.masks, threshold)
    return pd.Series(scores, index=pd.Index(keys, dtype=str), dtype=float)


def log_model(model: torch.nn.Module, meta: dict, limits: Validate | None = None, task: str = "segmentation"):
    """Log the served model (:mod:`polypflow.serving`: the checkpoint behind the one predictor; a base64 image in,
    its mask, or a detector's boxes, out), refusing images whose sides fall outside ``limits``
    (``validate.min_side``/``max_side``)."""
    from polypflow import serving

    bounds = SizeLimits(limits.min_side, limits.max_side) if limits is not None else SizeLimits()
    log_served = serving.log_detector if task == "detection" else serving.log_model
    return log_served(model.cpu(), meta, bounds)


def training_plan(params: Params, method: str) -> MethodPlan:
    """``method`` on the split's train set (subsampled to the recipe's limit), selected on its val set."""
    splits = read_splits(params)
    return plan_method(params, method, splits["train"], splits["val"])


def fit_checkpoint(params: Params, method: str, resume: bool = True,
                   on_epoch=None) -> tuple[torch.nn.Module, FitResult]:
    """Fit ``method`` to its checkpoint in ``artifacts/checkpoints/<method>/``, nothing else: the part of the
    stage a flow fans out (``--fit-only``); the stage itself then resumes the finished checkpoint."""
    return fit_plan(params, training_plan(params, method), method_layout(params, method).checkpoint, resume, on_epoch)


def run(params: Params, method: str, resume: bool = True) -> dict:
    """Train ``method``; write its model directory and return its metrics."""
    import mlflow

    plan = training_plan(params, method)
    files = method_layout(params, method)
    with tracking.stage_run(params, "train", method) as run:
        mlflow.log_params(tracking.flat("", {"method": method, "arch": plan.arch, "model": plan.kwargs,
                                              "recipe": plan.recipe.model_dump(), "seed": params.seed,
                                              "split.scheme": read_splits(params)["scheme"],
                                              "n_train": len(plan.train_keys), "n_val": len(plan.val_keys)}))
        tracking.log_image_sets(params, {"training": plan.train_keys, "validation": plan.val_keys})
        epochs = tracking.EpochLogger()
        model, result = fit_plan(params, plan, files.checkpoint, resume, epochs)
        epochs.backfill(result.history)
        if hasattr(model, "threshold") and isinstance(model.threshold, torch.Tensor):
            model.threshold.fill_(result.threshold)
        mean, std = NORMALIZATION[plan.recipe.normalize]
        metric = plan_task(params, plan).metric  # val_dice, or a detector's val_ap50
        meta = {"method": method, "arch": plan.arch, "task": plan.task, "model_kwargs": plan.kwargs,
                "image_size": plan.recipe.image_size, "normalize": plan.recipe.normalize, "mean": list(mean),
                "std": list(std), "threshold": result.threshold, metric: result.best_val_dice,
                "best_epoch": result.best_epoch}
        if plan.task == "detection":  # what the detector decodes its boxes with
            cfg = params.detection
            meta["decode"] = {"score_threshold": cfg.score_threshold, "nms_iou": cfg.nms_iou,
                              "max_detections": cfg.max_detections}
        val_scores = val_per_image(params, model, plan, result.threshold)
        score_name = "f1" if plan.task == "detection" else "dice"
        history = pd.DataFrame(result.history)
        metrics = {metric: result.best_val_dice, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "threshold": result.threshold, "image_size": plan.recipe.image_size}
        mlflow.log_metrics({f"best_{metric}": result.best_val_dice, "threshold": result.threshold})
        mlflow.log_text(history.to_csv(index=False), "history.csv")
        mlflow.log_text(val_scores.rename(score_name).rename_axis("key").reset_index().to_csv(index=False),
                        tracking.VAL_SCORES_ARTIFACT)
        info = log_model(model, meta, params.validate_, plan.task)
    # local outputs only once MLflow holds the model: a failed upload leaves the previous outputs consistent
    save_trained(files.model, model, **meta)
    with atomic_path(files.val_scores, suffix=".csv") as tmp:
        val_scores.rename(score_name).rename_axis("key").reset_index().to_csv(tmp, index=False)
    with atomic_path(files.history, suffix=".csv") as tmp:
        history.to_csv(tmp, index=False)
    write_json(files.metrics, metrics)
    write_json(files.run_record("train"), {"run_id": run.info.run_id, "model_uri": info.model_uri})
    log.info("%s: best %s %.4f at epoch %d", method, metric, result.best_val_dice, result.best_epoch)
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
