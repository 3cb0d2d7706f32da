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
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from polypflow import tracking
from polypflow.config import Evaluate, ExternalMethod, Params
from polypflow.data import by_image_key, load_image_set, read_image, read_mask
from polypflow.detection.inference import to_image_scale
from polypflow.inference import to_resolution, trained_predictor
from polypflow.io import atomic_path, write_json, write_png
from polypflow.metrics import MODEL_DICE, TOOLBOX_CURVES, LEVELS, score_image, summarize
from polypflow.layout import MethodLayout, method_layout, read_facts, read_json, read_splits
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
    probs: Sequence[np.ndarray]  # as predicted (a model's input size, or a map's own), for the case overlays
    boxes: list[tuple] | None = None  # per image (ground-truth boxes, the map's components as Detections)


def rows_of(facts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return by_image_key(facts).loc[keys]


ProbabilityMaps = Callable[[str, list[str]], tuple[list[str], Sequence[np.ndarray]]]


def model_maps(model, meta: dict, params: Params, facts: pd.DataFrame) -> ProbabilityMaps:
    """A trained model's probability maps (at its input size) of a test set's images, by the one predictor."""
    predictor = trained_predictor(model, meta, device=resolve_device(params.device), batch_size=params.evaluate.batch_size)

    def maps(dataset: str, keys: list[str]) -> tuple[list[str], np.ndarray]:
        data = load_image_set(facts, keys, meta["image_size"], params.validate_.mask_threshold, params.paths.cache)
        return keys, predictor.probs(data.images)

    return maps


def read_map(path: Path) -> np.ndarray:
    """A grey 8-bit probability map (the toolbox's PNG) as float32 in [0, 1]; an error names the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode prediction map ({exc})") from exc


def external_maps(spec: ExternalMethod) -> ProbabilityMaps:
    """An external method's maps, ``<root>/<folder>/<id>.png``; images without a map are left out."""

    def maps(dataset: str, keys: list[str]) -> tuple[list[str], list[np.ndarray]]:
        if dataset not in spec.folders:
            return [], []
        folder = Path(spec.root) / spec.folders[dataset]
        paths = {key: folder / f"{key.split('/', 1)[1]}.png" for key in keys}
        found = [key for key in keys if paths[key].is_file()]
        return found, [read_map(paths[key]) for key in found]

    return maps


def workers() -> int:
    """Threads that score images at once: the cores this process may use (numpy's sort, OpenCV and SciPy's
    filters release the GIL; 2 threads score 2.3x faster than one on a 2-core machine, the same figures)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def score_dataset(keys: list[str], probs: Sequence[np.ndarray], method_threshold: float, params: Params,
                  facts: pd.DataFrame, boxes: bool = False) -> DatasetScores:
    """Per-image metrics, the mean PR curve, threshold sweep and toolbox curves of one test set, each map
    resized to its mask's original resolution; with ``boxes``, also each mask's ground-truth boxes and the map's
    components as boxes at ``method_threshold`` (``DatasetScores.boxes``)."""
    from polypflow.detection.evaluate import boxes_from_probability

    pr_t, sweep_t = np.linspace(0, 1, params.evaluate.pr_points), sweep_thresholds(params.evaluate)
    cfg = params.detection

    def one(item):
        prob, mask_path = item
        gt = read_mask(mask_path, params.validate_.mask_threshold)
        full = to_resolution(prob, gt.shape)
        scores = score_image(full, gt, params.evaluate.threshold, method_threshold, pr_t, sweep_t)
        found = (gt_boxes(gt, params),
                 boxes_from_probability(full, method_threshold, cfg.min_box_area)) if boxes else None
        return scores, found

    with ThreadPoolExecutor(workers()) as pool:
        results = list(pool.map(one, zip(probs, rows_of(facts, keys)["mask_path"], strict=True)))
    rows, prs, sweeps, curves = [], [], [], {name: [] for name in TOOLBOX_CURVES}
    for key, (scores, _) in zip(keys, results, strict=True):
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
    box_pairs = [found for _, found in results] if boxes else None
    return DatasetScores(pd.DataFrame(rows), pr, sweep, curve, list(probs), box_pairs)


def case_image(image_path: str, mask_path: str, prob: np.ndarray, threshold: float, mask_threshold: int) -> np.ndarray:
    """image | overlay (prediction red, truth outline green) at the image's resolution, scaled down."""
    image, gt = read_image(image_path), read_mask(mask_path, mask_threshold)
    full = cv2.resize(prob, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
    if image.shape[:2] != gt.shape:
        image = cv2.resize(image, gt.shape[::-1], interpolation=cv2.INTER_AREA)
    return to_case_height(np.concatenate([image, draw_overlay(image, full >= threshold, gt)], axis=1))


def to_case_height(image: np.ndarray) -> np.ndarray:
    """A drawn case scaled to ``CASE_HEIGHT`` pixels high (area interpolation)."""
    scale = CASE_HEIGHT / image.shape[0]
    return cv2.resize(image, (round(image.shape[1] * scale), CASE_HEIGHT), interpolation=cv2.INTER_AREA)


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


def evaluate_all(maps: ProbabilityMaps, method_threshold: float, params: Params, splits: dict, facts: pd.DataFrame,
                 files: MethodLayout) -> dict:
    """Score every test set ``maps`` covers; write the tables and case overlays; return ``summary`` (with the
    mask's components scored as boxes, ``box_*``, when ``detection.mask_boxes``)."""
    unseen = set(splits.get("unseen", []))
    tables: dict[str, list[pd.DataFrame]] = {"per_image": [], "pr": [], "sweep": [], "curves": []}
    summary, cases = {}, []
    for dataset, listed in splits["test"].items():
        keys, probs = maps(dataset, listed) if listed else ([], [])
        if not keys:
            continue
        protocol = "unseen" if dataset in unseen else "seen"
        scores = score_dataset(keys, probs, method_threshold, params, facts, boxes=params.detection.mask_boxes)
        for name in tables:
            tables[name].append(getattr(scores, name).assign(dataset=dataset, protocol=protocol))
        curves = {f"{name}": scores.curves[name].to_numpy() for name in TOOLBOX_CURVES}
        missing = {"n_missing": len(listed) - len(keys)} if len(keys) < len(listed) else {}
        summary[dataset] = {"protocol": protocol, **missing,
                            **{k: json_number(v) for k, v in summarize(scores.per_image, curves).items()}}
        if scores.boxes is not None:
            summary[dataset].update({k: json_number(v) for k, v in mask_box_metrics(scores).items()})
        cases += draw_cases(scores, dataset, facts, params, method_threshold, files.cases_dir)
        s = summary[dataset]
        fixed = params.evaluate.threshold
        log.info("%s (%s): mDice@%.2f %.4f%s meanDic %.4f S %.4f (n=%d%s)", dataset, protocol, method_threshold,
                 s[MODEL_DICE], "" if method_threshold == fixed else f" (mDice@{fixed:.2f} {s['dice']:.4f})",
                 s["tb_dice"], s["sm"], len(keys), f", {len(listed) - len(keys)} without a map" if missing else "")
    if not summary:
        return summary
    for name, parts in tables.items():
        write_csv(files.eval_table(name), pd.concat(parts))
    write_csv(files.cases, pd.DataFrame(cases, columns=["dataset", "kind", "rank", "key", "dice", "file"]))
    return summary


# ---------------------------------------------------------------- boxes: a detector's, and a segmenter's mask's


def gt_boxes(mask: np.ndarray, params: Params) -> torch.Tensor:
    """Ground-truth boxes of one mask at its own resolution: one per connected component of at least
    ``detection.min_box_area`` pixels."""
    from polypflow.detection.boxes import mask_to_boxes

    return torch.from_numpy(mask_to_boxes(mask, params.detection.min_box_area).boxes)


def truth_boxes(facts: pd.DataFrame, keys: list[str], params: Params) -> list[torch.Tensor]:
    """:func:`gt_boxes` of each image's mask."""
    paths = rows_of(facts, keys)["mask_path"]
    return [gt_boxes(read_mask(path, params.validate_.mask_threshold), params) for path in paths]


def mask_box_metrics(scores: DatasetScores) -> dict[str, float]:
    """COCO AP/AP50/AP75/AR100 of a segmenter's mask as boxes (each component of its map at its threshold,
    scored by its mean probability; :func:`score_dataset` with ``boxes``), prefixed ``box_``: the baseline a
    dedicated detector must beat."""
    from polypflow.detection.evaluate import coco_metrics

    truth, found = zip(*scores.boxes, strict=True)
    return {f"box_{k}": v for k, v in coco_metrics(list(found), list(truth)).metrics.items()}


def mask_shapes(facts: pd.DataFrame, keys: list[str]) -> list[tuple[int, int]]:
    """(H, W) of each image's mask: the resolution everything is scored at."""
    rows = rows_of(facts, keys)
    return [(int(h), int(w)) for h, w in zip(rows["mask_height"], rows["mask_width"], strict=True)]


def score_threshold_sweep(predictions: list, truth: list[torch.Tensor], thresholds: np.ndarray) -> pd.DataFrame:
    """Box F1, precision and recall (matches at IoU 0.5, COCO's rule) at each score threshold."""
    from polypflow.detection.evaluate import match_image

    rows = []
    for t in thresholds:
        counts = pd.DataFrame([match_image(p, b, float(t)) for p, b in zip(predictions, truth, strict=True)])
        tp, fp, fn = (int(counts[c].sum()) for c in ("tp", "fp", "fn"))
        rows.append({"threshold": float(t), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
                     "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)})
    return pd.DataFrame(rows)


def draw_box_cases(per_image: pd.DataFrame, predictions: list, truth: list[torch.Tensor], dataset: str,
                   facts: pd.DataFrame, params: Params, out: Path) -> list[dict]:
    """The best and worst ``evaluate.cases`` images of a test set by box F1, drawn with their boxes (truth green,
    detections from ``detection.match_score`` red, with scores)."""
    from polypflow.detection.evaluate import draw_boxes, pick_cases

    rows = []
    for kind, rank, i in pick_cases(per_image, params.evaluate.cases):
        key = per_image.iloc[i]["key"]
        image = read_image(rows_of(facts, [key]).iloc[0]["image_path"])
        name = f"{dataset}_{kind}{rank}.png"
        write_png(out / name, to_case_height(draw_boxes(image, truth[i], predictions[i], params.detection.match_score)))
        rows.append({"dataset": dataset, "kind": kind, "rank": rank, "key": key,
                     "f1": float(per_image.iloc[i]["f1"]), "file": name})
    return rows


def evaluate_detector(model, meta: dict, params: Params, splits: dict, facts: pd.DataFrame, files: MethodLayout) -> dict:
    """A detector on every test set: COCO AP/AP50/AP75/AR100 (``box_*``, the same keys as a segmenter's mask
    boxes), the PR curve at IoU 0.5 (``pr.csv``, and with scores ``curves.csv``), box F1 over score thresholds
    (``sweep.csv``), per-image matches (``per_image.csv``) and drawn cases; returns ``summary``."""
    from polypflow.detection.evaluate import coco_metrics, per_image_scores
    from polypflow.detection.inference import trained_box_predictor

    predictor = trained_box_predictor(model, meta, device=resolve_device(params.device),
                                      batch_size=params.evaluate.batch_size)
    unseen = set(splits.get("unseen", []))
    tables: dict[str, list[pd.DataFrame]] = {"per_image": [], "pr": [], "sweep": [], "curves": []}
    summary, cases = {}, []
    for dataset, keys in splits["test"].items():
        if not keys:
            continue
        protocol = "unseen" if dataset in unseen else "seen"
        data = load_image_set(facts, keys, meta["image_size"], params.validate_.mask_threshold, params.paths.cache)
        predictions = [to_image_scale(d, meta["image_size"], shape)
                       for d, shape in zip(predictor.detect_resized(data.images), mask_shapes(facts, keys), strict=True)]
        truth = truth_boxes(facts, keys, params)
        scores = coco_metrics(predictions, truth)
        per_image = per_image_scores(keys, predictions, truth, predictor.match_score)
        per_image["n_truth"] = [len(t) for t in truth]
        tag = {"dataset": dataset, "protocol": protocol}
        tables["per_image"].append(per_image.assign(**tag))
        tables["pr"].append(scores.pr_curve[["recall", "precision"]].assign(**tag))
        tables["curves"].append(scores.pr_curve.assign(iou=0.5, **tag))
        tables["sweep"].append(score_threshold_sweep(predictions, truth, sweep_thresholds(params.evaluate)).assign(**tag))
        summary[dataset] = {"protocol": protocol, "n": len(keys), "n_boxes": int(sum(len(t) for t in truth)),
                            **{f"box_{k}": json_number(v) for k, v in scores.metrics.items()},
                            "f1": json_number(float(per_image["f1"].mean()))}
        cases += draw_box_cases(per_image, predictions, truth, dataset, facts, params, files.cases_dir)
        s = summary[dataset]
        log.info("%s (%s): AP %.4f AP50 %.4f AP75 %.4f AR100 %.4f, mean F1 %.4f at score %.2f (n=%d, %d boxes)",
                 dataset, protocol, s["box_ap"], s["box_ap50"], s["box_ap75"], s["box_ar100"], s["f1"],
                 predictor.match_score, len(keys), s["n_boxes"])
    for name, parts in tables.items():
        write_csv(files.eval_table(name), pd.concat(parts))
    write_csv(files.cases, pd.DataFrame(cases, columns=["dataset", "kind", "rank", "key", "f1", "file"]))
    files.gradcam_dir.mkdir(parents=True, exist_ok=True)  # Grad-CAM explains a segmenter's map: none for boxes
    return summary


def log_to_mlflow(params: Params, name: str, summary: dict, out: Path, splits: dict, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
    """The evaluate run: test metrics, the test sets as dataset inputs, the evaluation folder; returns its id."""
    import mlflow

    flat = {f"test.{d}.{k}": v for d, m in summary.items() for k, v in m.items()
            if k not in ("n", "protocol") and isinstance(v, (int, float))}
    with tracking.stage_run(params, "evaluate", name, parent_run_id=parent_run_id, tags=tags) as run:
        mlflow.log_metrics(flat)
        tracking.log_image_sets(params, {f"testing.{d}": splits["test"][d] for d in summary})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    return run.info.run_id


def run(params: Params, method: str) -> dict:
    """Evaluate ``method`` on every test set; write tables, overlays and ``summary.json``. ``method`` is a trained
    method, or an ``external`` one whose published maps are scored the same way."""
    if method in params.external:
        return run_external(params, method)
    files = method_layout(params, method)
    train_run = read_json(files.run_record("train"))["run_id"]
    tracking.require_run(params, train_run, files.run_record("train"))  # before the work, not after it
    model, meta = load_trained(files.model)
    splits, facts = read_splits(params), read_facts(params)
    if meta.get("task") == "detection":
        summary = evaluate_detector(model, meta, params, splits, facts, files)
        write_json(files.eval_summary, summary)
        run_id = log_to_mlflow(params, method, summary, files.eval_dir, splits, train_run)
        write_json(files.run_record("evaluate"), {"run_id": run_id})
        return summary
    summary = evaluate_all(model_maps(model, meta, params, facts), meta["threshold"], params, splits, facts, files)
    first = next(keys for keys in splits["test"].values() if keys)
    panels = gradcam_panels(model, meta, params, facts, first, files.gradcam_dir)
    write_json(files.eval_summary, summary)
    run_id = log_to_mlflow(params, method, summary, files.eval_dir, splits, train_run)
    write_json(files.run_record("evaluate"), {"run_id": run_id})
    log.info("%d Grad-CAM panels in %s", len(panels), files.gradcam_dir)
    return summary


def run_external(params: Params, name: str) -> dict:
    """Score external method ``name``'s maps like a model's; its own evaluate run in MLflow, no registry."""
    spec = params.external[name]
    if not Path(spec.root).is_dir():
        raise FileNotFoundError(f"{spec.root}: no such folder (external.{name}.root)")
    splits, facts = read_splits(params), read_facts(params)
    files = method_layout(params, name)
    summary = evaluate_all(external_maps(spec), spec.threshold, params, splits, facts, files)
    if not summary:
        raise ValueError(f"external.{name}: no map in {spec.root} matches a test image of splits.json")
    write_json(files.eval_summary, summary)
    run_id = log_to_mlflow(params, name, summary, files.eval_dir, splits, tags={"polypflow.external": spec.title})
    write_json(files.run_record("evaluate"), {"run_id": run_id})
    return summary


if __name__ == "__main__":
    method_main(__doc__, run)
