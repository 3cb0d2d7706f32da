"""Stage 4, train@<method>: train one configured method on the split's train set, select on val.

Writes ``artifacts/models/<method>/`` (model.pt, metrics.json, history.csv, run.json) and keeps a
resumable per-epoch checkpoint in ``artifacts/checkpoints/<method>/`` (a persistent DVC output). The
MLflow run logs params, per-epoch metrics and the model, which is registered under the method's name;
alias ``champion`` moves to it when its validation Dice beats the current champion's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models import build_model
from polypflow import tracking
from polypflow.config import Params, Recipe, Validate, load_params
from polypflow.data import NORMALIZATION, load_image_set
from polypflow.inference import SizeLimits
from polypflow.io import atomic_path, write_json
from polypflow.metrics import dice_batch
from polypflow.pipeline import checkpoint_dir, method_arch, model_dir, read_facts, read_splits
from polypflow.training import (FitResult, fit, load_checkpoint, predict_probs, resolve_device, save_trained,
                                seed_everything)
from stages._cli import main, parser

log = logging.getLogger(__name__)


def subsample(keys: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded subset of at most ``limit`` keys (all of them when ``limit`` is None)."""
    if limit is None or len(keys) <= limit:
        return list(keys)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(keys, size=limit, replace=False).tolist())


def train_keys(params: Params, splits: dict, recipe: Recipe) -> list[str]:
    """The training images of a method: the split's train set, subsampled to the recipe's limit."""
    return subsample(splits["train"], recipe.max_train_items, params.seed)


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_method(params: Params, method: str, train_keys: list[str], val_keys: list[str], recipe: Recipe,
                 checkpoint: Path, resume: bool, on_epoch=None) -> tuple[torch.nn.Module, FitResult]:
    """Build ``method``, load its data and fit it; the shared core of train and crossval."""
    arch, kwargs = method_arch(params, method)
    facts = read_facts(params)
    load = lambda keys: load_image_set(facts, keys, recipe.image_size, params.validate_.mask_threshold, params.paths.cache)  # noqa: E731
    train, val = load(train_keys), load(val_keys)
    tag = fingerprint(arch, kwargs, recipe.model_dump(), train_keys, val_keys, params.seed)
    if resume and checkpoint.exists() and load_checkpoint(checkpoint).get("fingerprint") != tag:
        log.info("%s belongs to other settings; starting afresh", checkpoint)
        checkpoint.unlink()
    seed_everything(params.seed)
    model = build_model(arch, **kwargs)
    result = fit(model, recipe, train, val, resolve_device(params.device), checkpoint, params.seed,
                 resume=resume, on_epoch=on_epoch, checkpoint_extra={"fingerprint": tag})
    return model, result


def val_per_image(params: Params, model: torch.nn.Module, keys: list[str], recipe: Recipe,
                  threshold: float) -> pd.Series:
    """Validation Dice of each image at the model's ``threshold``, indexed by key, for promotion."""
    data = load_image_set(read_facts(params), keys, recipe.image_size, params.validate_.mask_threshold, params.paths.cache)
    probs = predict_probs(model, data.images, recipe.normalize, resolve_device(params.device))
    return pd.Series(dice_batch(probs, data.masks, threshold) if len(keys) else [], index=pd.Index(keys, dtype=str),
                     dtype=float)


def log_model(model: torch.nn.Module, meta: dict, limits: Validate | None = None):
    """Log the served model (:mod:`polypflow.serving`: the checkpoint behind the one predictor; a base64 image in,
    its mask out), refusing images whose sides fall outside ``limits`` (``validate.min_side``/``max_side``)."""
    from polypflow import serving

    bounds = SizeLimits(limits.min_side, limits.max_side) if limits is not None else SizeLimits()
    return serving.log_model(model.cpu(), meta, bounds)


def fit_checkpoint(params: Params, method: str, resume: bool = True,
                   on_epoch=None) -> tuple[torch.nn.Module, FitResult]:
    """Fit ``method`` to its checkpoint in ``artifacts/checkpoints/<method>/``, nothing else: the part of the
    stage a flow fans out (``--fit-only``); the stage itself then resumes the finished checkpoint."""
    recipe = params.recipe(method)
    splits = read_splits(params)
    ckpt = checkpoint_dir(params, method) / "checkpoint.pt"
    return train_method(params, method, train_keys(params, splits, recipe), splits["val"], recipe, ckpt, resume,
                        on_epoch)


def run(params: Params, method: str, resume: bool = True) -> dict:
    """Train ``method``; write its model directory and return its metrics."""
    import mlflow

    recipe = params.recipe(method)
    splits = read_splits(params)
    out = model_dir(params, method)
    arch, kwargs = method_arch(params, method)
    with tracking.stage_run(params, "train", method) as run:
        mlflow.log_params(tracking.flat("", {"method": method, "arch": arch, "model": kwargs,
                                              "recipe": recipe.model_dump(), "seed": params.seed,
                                              "split.scheme": splits["scheme"],
                                              "n_train": len(train_keys(params, splits, recipe)),
                                              "n_val": len(splits["val"])}))
        epochs = tracking.EpochLogger()
        model, result = fit_checkpoint(params, method, resume, epochs)
        epochs.backfill(result.history)
        if hasattr(model, "threshold") and isinstance(model.threshold, torch.Tensor):
            model.threshold.fill_(result.threshold)
        meta = {"method": method, "arch": arch, "model_kwargs": kwargs, "image_size": recipe.image_size,
                "normalize": recipe.normalize, "mean": list(NORMALIZATION[recipe.normalize][0]),
                "std": list(NORMALIZATION[recipe.normalize][1]), "threshold": result.threshold,
                "val_dice": result.best_val_dice, "best_epoch": result.best_epoch}
        val_scores = val_per_image(params, model, splits["val"], recipe, result.threshold)
        history = pd.DataFrame(result.history)
        metrics = {"val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "threshold": result.threshold}
        mlflow.log_metrics({"best_val_dice": result.best_val_dice, "threshold": result.threshold})
        mlflow.log_text(history.to_csv(index=False), "history.csv")
        info = log_model(model, meta, params.validate_)
        registry = {}
        if params.tracking.register_models:
            registry = tracking.register(info.model_uri, method, tags={**meta, "model_kwargs": json.dumps(kwargs)},
                                         score=result.best_val_dice, val_scores=val_scores, run_id=run.info.run_id,
                                         promotion=params.tracking.promotion, seed=params.seed,
                                         global_name=params.tracking.global_model)
    # local outputs only once MLflow holds the model: a failed upload leaves the previous outputs consistent
    save_trained(out / "model.pt", model, **meta)
    with atomic_path(out / "val_per_image.csv", suffix=".csv") as tmp:
        val_scores.rename_axis("key").rename("dice").reset_index().to_csv(tmp, index=False)
    with atomic_path(out / "history.csv", suffix=".csv") as tmp:
        history.to_csv(tmp, index=False)
    write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"run_id": run.info.run_id, "model_uri": info.model_uri, **registry})
    log.info("%s: best val Dice %.4f at epoch %d (registry: %s)", method, result.best_val_dice, result.best_epoch, registry)
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
    main(lambda: stage(load_params(args.params), args.method, resume=args.resume))
