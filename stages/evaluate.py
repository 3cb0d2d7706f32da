"""Stage 6, evaluate@<method>: per-image metrics on every test set, summaries, curves, cases, Grad-CAM.

Predictions are made at the method's training size and resized to each ground-truth mask's original
resolution before scoring, as the community's evaluation protocol does. Test sets come from
``splits.json``: the in-domain test part of each split dataset (``seen``) and every unseen dataset
(``unseen``, PraNet protocol). Metrics (``polypflow.metrics``): Dice/IoU/precision/sensitivity/
specificity/FNR/accuracy at ``evaluate.threshold`` and Dice/IoU at the method's own threshold, MAE,
AUC-ROC, and the toolbox's meanDic/meanIoU/S-measure/E-measure/weighted F-measure (pysodmetrics).

Writes ``per_image.csv``, ``summary.json`` (per test set: n, protocol, means, maxDic/maxEm), ``pr.csv``
(mean precision/recall over ``pr_points`` thresholds), ``sweep.csv`` (mean Dice/IoU/sensitivity/
precision over ``evaluate.sweep``), ``curves.csv`` (the toolbox's 256-threshold Dice/IoU/E-measure
curves), ``cases/`` (best and worst ``evaluate.cases`` images per test set: image | overlay, prediction
red, truth green; ``cases.csv``) and ``gradcam/`` panels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from polypflow import tracking
from polypflow.config import Evaluate, Params
from polypflow.data import load_image_set, read_image, read_mask
from polypflow.inference import to_resolution, trained_predictor
from polypflow.io import atomic_path, write_json, write_png
from polypflow.metrics import MODEL_DICE, TOOLBOX_CURVES, LEVELS, score_image, summarize
from polypflow.pipeline import by_image_key, model_dir, read_facts, read_json, read_splits, stage_dir
from polypflow.predict import draw_overlay
from polypflow.training import load_trained, resolve_device
from stages._cli import method_main

log = logging.getLogger(__name__)
GRADCAM_PANELS = 4
CASE_HEIGHT = 256


def sweep_thresholds(cfg: Evaluate) -> np.ndarray:
    low, high = cfg.sweep
    return np.round(np.arange(low, high + cfg.sweep_step / 2, cfg.sweep_step), 6)


@dataclass
class DatasetScores:
    per_image: pd.DataFrame
    pr: pd.DataFrame
    sweep: pd.DataFrame
    curves: pd.DataFrame
    probs: np.ndarray  # at the model's input size, for the case overlays


def rows_of(facts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return by_image_key(facts).loc[keys]


def score_dataset(model, meta: dict, params: Params, facts: pd.DataFrame, keys: list[str]) -> DatasetScores:
    """Per-image metrics, the mean PR curve, threshold sweep and toolbox curves of one test set."""
    size, threshold = meta["image_size"], params.validate_.mask_threshold
    data = load_image_set(facts, keys, size, threshold, params.paths.cache)
    device = resolve_device(params.device)
    probs = trained_predictor(model, meta, device=device, batch_size=params.evaluate.batch_size).probs(data.images)
    pr_t, sweep_t = np.linspace(0, 1, params.evaluate.pr_points), sweep_thresholds(params.evaluate)
    rows, prs, sweeps, curves = [], [], [], {name: [] for name in TOOLBOX_CURVES}
    for key, prob, mask_path in zip(keys, probs, rows_of(facts, keys)["mask_path"], strict=True):
        gt = read_mask(mask_path, threshold)
        full = to_resolution(prob, gt.shape)
        scores = score_image(full, gt, params.evaluate.threshold, meta["threshold"], pr_t, sweep_t)
        rows.append({"key": key, **scores.row})
        prs.append(scores.pr)
        sweeps.append(pd.DataFrame(scores.sweep))
        for name in TOOLBOX_CURVES:
            curves[name].append(scores.curves[name])
    pr_mean = np.mean(prs, axis=0)
    pr = pd.DataFrame({"threshold": pr_t, "precision": pr_mean[:, 0], "recall": pr_mean[:, 1]})
    sweep = pd.concat(sweeps).groupby("threshold", as_index=False).mean()
    curve = pd.DataFrame({"level": np.arange(LEVELS), "threshold": np.arange(LEVELS) / (LEVELS - 1),
                          **{name: np.mean(values, axis=0) for name, values in curves.items()}})
    return DatasetScores(pd.DataFrame(rows), pr, sweep, curve, probs)


def case_image(image_path: str, mask_path: str, prob: np.ndarray, threshold: float, mask_threshold: int) -> np.ndarray:
    """image | overlay (prediction red, truth outline green) at the image's resolution, scaled down."""
    image, gt = read_image(image_path), read_mask(mask_path, mask_threshold)
    full = cv2.resize(prob, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
    if image.shape[:2] != gt.shape:
        image = cv2.resize(image, gt.shape[::-1], interpolation=cv2.INTER_AREA)
    pair = np.concatenate([image, draw_overlay(image, full >= threshold, gt)], axis=1)
    scale = CASE_HEIGHT / pair.shape[0]
    return cv2.resize(pair, (round(pair.shape[1] * scale), CASE_HEIGHT), interpolation=cv2.INTER_AREA)


def draw_cases(scores: DatasetScores, dataset: str, facts: pd.DataFrame, params: Params, threshold: float,
               out: Path) -> list[dict]:
    """Overlays of the best and worst ``evaluate.cases`` images of one test set, by the Dice at the model's
    ``threshold`` (the prediction drawn at it)."""
    k = min(params.evaluate.cases, len(scores.per_image))
    order = scores.per_image.reset_index(drop=True).sort_values([MODEL_DICE, "key"], ascending=[False, True], kind="stable")
    picks = [("best", r, i) for r, i in enumerate(order.index[:k], 1)] + \
            [("worst", r, i) for r, i in enumerate(order.index[::-1][:k], 1)]
    rows = []
    for kind, rank, i in picks:
        record = scores.per_image.iloc[i]
        paths = rows_of(facts, [record["key"]]).iloc[0]
        name = f"{dataset}_{kind}{rank}.png"
        write_png(out / name, case_image(paths["image_path"], paths["mask_path"], scores.probs[i],
                                        threshold, params.validate_.mask_threshold))
        rows.append({"dataset": dataset, "kind": kind, "rank": rank, "key": record["key"],
                     "dice": float(record[MODEL_DICE]), "file": name})
    return rows


def gradcam_panels(model, meta: dict, params: Params, facts: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    """Grad-CAM panels (image | truth | prediction | overlay) for the first test images."""
    from polypflow.gradcam import save_panels

    size = (meta["image_size"] // 32) * 32
    data = load_image_set(facts, keys[:GRADCAM_PANELS], size, params.validate_.mask_threshold, params.paths.cache)
    names = [k.replace("/", "_") for k in data.keys]
    return save_panels(model.cpu(), list(data.images), out, masks=list(data.masks), names=names,
                       normalize=meta["normalize"], threshold=meta["threshold"])


def write_csv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)


def json_number(value: float | int) -> float | int | None:
    """Rounded for summary.json; NaN (e.g. AUC where every mask is empty) becomes null."""
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    return value


def evaluate_all(model, meta: dict, params: Params, splits: dict, facts: pd.DataFrame, out: Path) -> dict:
    """Score every non-empty test set; write the tables and case overlays; return ``summary``."""
    unseen = set(splits.get("unseen", []))
    tables: dict[str, list[pd.DataFrame]] = {"per_image": [], "pr": [], "sweep": [], "curves": []}
    summary, cases = {}, []
    for dataset, keys in splits["test"].items():
        if not keys:
            continue
        protocol = "unseen" if dataset in unseen else "seen"
        scores = score_dataset(model, meta, params, facts, keys)
        for name in tables:
            tables[name].append(getattr(scores, name).assign(dataset=dataset, protocol=protocol))
        curves = {f"{name}": scores.curves[name].to_numpy() for name in TOOLBOX_CURVES}
        summary[dataset] = {"protocol": protocol, **{k: json_number(v) for k, v in summarize(scores.per_image, curves).items()}}
        cases += draw_cases(scores, dataset, facts, params, meta["threshold"], out / "cases")
        s = summary[dataset]
        fixed = params.evaluate.threshold
        log.info("%s (%s): mDice@%.2f %.4f%s meanDic %.4f S %.4f (n=%d)", dataset, protocol, meta["threshold"],
                 s[MODEL_DICE], "" if meta["threshold"] == fixed else f" (mDice@{fixed:.2f} {s['dice']:.4f})",
                 s["tb_dice"], s["sm"], len(keys))
    for name, parts in tables.items():
        write_csv(out / f"{name}.csv", pd.concat(parts))
    write_csv(out / "cases" / "cases.csv", pd.DataFrame(cases, columns=["dataset", "kind", "rank", "key", "dice", "file"]))
    return summary


def log_to_mlflow(params: Params, method: str, train_run: dict, summary: dict, out: Path) -> None:
    """Metrics on an evaluate run and on the training run; test Dice as model-version tags."""
    import mlflow

    flat = {f"test.{d}.{k}": v for d, m in summary.items() for k, v in m.items()
            if k not in ("n", "protocol") and isinstance(v, (int, float))}
    with tracking.stage_run(params, "evaluate", method, parent_run_id=train_run["run_id"]):
        mlflow.log_metrics(flat)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    client = mlflow.MlflowClient()
    for key, value in flat.items():  # also on the training run, so the UI compares methods side by side
        client.log_metric(train_run["run_id"], key, value)
    versions = [(method, train_run.get("version"))]
    if isinstance(train_run.get("global"), dict):
        versions.append((train_run["global"]["name"], train_run["global"]["version"]))
    for name, version in versions:
        if not version:
            continue
        for dataset, m in summary.items():
            client.set_model_version_tag(name, str(version), f"test_dice.{dataset}", f"{m[MODEL_DICE]:.4f}")
            client.set_model_version_tag(name, str(version), f"test_meandic.{dataset}", f"{m['tb_dice']:.4f}")


def run(params: Params, method: str) -> dict:
    """Evaluate ``method``'s trained model on every test set; write tables, overlays and ``summary.json``."""
    model, meta = load_trained(model_dir(params, method) / "model.pt")
    train_run = read_json(model_dir(params, method) / "run.json")
    splits, facts = read_splits(params), read_facts(params)
    out = stage_dir(params, "eval", method)
    summary = evaluate_all(model, meta, params, splits, facts, out)
    first = next(keys for keys in splits["test"].values() if keys)
    panels = gradcam_panels(model, meta, params, facts, first, out / "gradcam")
    write_json(out / "summary.json", summary)
    log_to_mlflow(params, method, train_run, summary, out)
    log.info("%d Grad-CAM panels in %s", len(panels), out / "gradcam")
    return summary


if __name__ == "__main__":
    method_main(__doc__, run)
