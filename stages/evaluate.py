"""Stage 6, evaluate@<method>: per-image metrics on every test set, summaries, PR curves, Grad-CAM.

Predictions are made at the method's training size and resized to each ground-truth mask's original
resolution before scoring, as the community's evaluation protocol does. Test sets come from
``splits.json``: the in-domain test part of each split dataset and every unseen dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from polypflow import tracking
from polypflow.config import Params, load_params
from polypflow.data import load_image_set, read_mask
from polypflow.io import atomic_path, write_json
from polypflow.metrics import binary_metrics, pr_points
from polypflow.pipeline import model_dir, read_facts, read_json, read_splits, stage_dir
from polypflow.training import load_trained, predict_probs, resolve_device
from stages._cli import main, parser

log = logging.getLogger(__name__)
GRADCAM_PANELS = 4


def score_dataset(model, meta: dict, params: Params, facts: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image metrics (at 0.5 and at the method's threshold) and the mean PR curve of one test set."""
    size, threshold = meta["image_size"], params.validate_.mask_threshold
    data = load_image_set(facts, keys, size, threshold, params.paths.cache)
    device = resolve_device(params.device)
    probs = predict_probs(model, data.images, meta["normalize"], device, params.evaluate.batch_size)
    mask_paths = facts.assign(key=facts["dataset"] + "/" + facts["id"]).set_index("key").loc[keys, "mask_path"]
    thresholds = np.linspace(0, 1, params.evaluate.pr_points)
    rows, precisions, recalls = [], [], []
    for key, prob, mask_path in zip(keys, probs, mask_paths, strict=True):
        gt = read_mask(mask_path, threshold)
        full = np.clip(cv2.resize(prob, gt.shape[::-1], interpolation=cv2.INTER_LINEAR), 0, 1)
        row = {"key": key, **binary_metrics(full, gt, params.evaluate.threshold)}
        row.update({f"{k}_at_method_threshold": v for k, v in binary_metrics(full, gt, meta["threshold"]).items() if k in ("dice", "iou")})
        rows.append(row)
        p, r = pr_points(full, gt, thresholds)
        precisions.append(p)
        recalls.append(r)
    pr = pd.DataFrame({"threshold": thresholds, "precision": np.mean(precisions, 0), "recall": np.mean(recalls, 0)})
    return pd.DataFrame(rows), pr


def gradcam_panels(model, meta: dict, params: Params, facts: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    """Grad-CAM panels (image | truth | prediction | overlay) for the first test images."""
    from polypflow.gradcam import save_panels

    size = (meta["image_size"] // 32) * 32
    data = load_image_set(facts, keys[:GRADCAM_PANELS], size, params.validate_.mask_threshold, params.paths.cache)
    names = [k.replace("/", "_") for k in data.keys]
    return save_panels(model.cpu(), list(data.images), out, masks=list(data.masks), names=names,
                       normalize=meta["normalize"], threshold=meta["threshold"])


def run(params: Params, method: str) -> dict:
    """Evaluate ``method``'s trained model on every test set; write CSVs and ``summary.json``."""
    import mlflow

    model, meta = load_trained(model_dir(params, method) / "model.pt")
    train_run = read_json(model_dir(params, method) / "run.json")
    splits, facts = read_splits(params), read_facts(params)
    out = stage_dir(params, "eval", method)
    per_image, curves, summary = [], [], {}
    for dataset, keys in splits["test"].items():
        if not keys:
            continue
        scores, pr = score_dataset(model, meta, params, facts, keys)
        per_image.append(scores.assign(dataset=dataset))
        curves.append(pr.assign(dataset=dataset))
        summary[dataset] = {"n": len(scores), **scores.drop(columns="key").mean().round(6).to_dict()}
        log.info("%s on %s: mDice %.4f mIoU %.4f (n=%d)", method, dataset, summary[dataset]["dice"], summary[dataset]["iou"], len(scores))
    with atomic_path(out / "per_image.csv", suffix=".csv") as tmp:
        pd.concat(per_image).to_csv(tmp, index=False)
    with atomic_path(out / "pr.csv", suffix=".csv") as tmp:
        pd.concat(curves).to_csv(tmp, index=False)
    first = next(keys for keys in splits["test"].values() if keys)
    panels = gradcam_panels(model, meta, params, facts, first, out / "gradcam")
    write_json(out / "summary.json", summary)
    flat = {f"test.{d}.{k}": v for d, m in summary.items() for k, v in m.items() if k != "n"}
    with tracking.stage_run(params, "evaluate", method, parent_run_id=train_run["run_id"]):
        mlflow.log_metrics(flat)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    client = mlflow.MlflowClient()
    for key, value in flat.items():  # also on the training run, so the UI compares methods side by side
        client.log_metric(train_run["run_id"], key, value)
    if train_run.get("version"):
        for dataset, m in summary.items():
            client.set_model_version_tag(method, str(train_run["version"]), f"test_dice.{dataset}", f"{m['dice']:.4f}")
    log.info("%d Grad-CAM panels in %s", len(panels), out / "gradcam")
    return summary


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--method", required=True)
    args = p.parse_args()
    main(lambda: run(load_params(args.params), args.method))
