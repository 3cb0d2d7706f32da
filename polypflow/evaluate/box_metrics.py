"""Detection metrics per test set, per-image scores, best/worst picks, and boxes from a segmenter's map.

* **COCO metrics** from torchmetrics' ``MeanAveragePrecision`` (pycocotools backend): AP (IoU
  0.50:0.95), AP50, AP75 and AR with at most 100 detections per image. Images with neither ground truth
  nor detections take no part (as in COCO); a set without any ground-truth box has undefined AP (NaN).
* **Precision-recall curve at IoU 0.5**: COCO's own interpolated precision at its 101 recall points
  (from the same evaluation, ``extended_summary``), with the score reached there; precision is 0 beyond
  the highest recall reached.
* **Per image** (for best and worst cases): detections scoring at least a threshold are matched greedily,
  best score first, to the unmatched ground-truth box of highest IoU >= 0.5 (COCO's rule); F1 of the
  matches (1 for an image with neither boxes nor detections) and the mean IoU of matched pairs.
* **Boxes from a segmenter's mask**: the connected components of ``probability >= threshold``, each
  scored with the *mean* probability inside its component (the max is near 1 for almost every component
  a segmenter draws and would not rank them; the mean rewards a component the model is sure of over its
  whole extent), so segmenters are scored by the same AP code as the detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from models.gfl_atss import Detections
from polypflow.data.boxes import components, mask_to_boxes

METRICS = {"map": "ap", "map_50": "ap50", "map_75": "ap75", "mar_100": "ar100"}


@dataclass(frozen=True)
class DetectionScores:
    """One test set's COCO metrics (``ap``, ``ap50``, ``ap75``, ``ar100``) and PR curve at IoU 0.5."""

    metrics: dict[str, float]
    pr_curve: pd.DataFrame  # recall, precision, score


def coco_metrics(predictions: list[Detections], targets: list[torch.Tensor]) -> DetectionScores:
    """COCO AP/AP50/AP75/AR100 and the IoU-0.5 PR curve of ``predictions`` against ``targets`` (per image
    K×4 boxes, pixels), one class."""
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", extended_summary=True, backend="pycocotools")
    label = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    metric.update([{"boxes": p.boxes.float(), "scores": p.scores.float(), "labels": label(len(p.boxes))} for p in predictions],
                  [{"boxes": t.float().reshape(-1, 4), "labels": label(len(t))} for t in targets])
    result = metric.compute()
    metrics = {name: float(result[key]) for key, name in METRICS.items()}
    metrics = {k: (v if v >= 0 else float("nan")) for k, v in metrics.items()}  # COCO's -1: no ground truth
    recall = np.linspace(0.0, 1.0, 101)
    if result["precision"].shape[2] == 0:  # no class seen: no ground truth and no detection at all
        precision = score = np.full(len(recall), -1.0)
    else:  # IoU 0.5, every recall point, the class, area "all", 100 detections
        precision, score = (result[k][0, :, 0, 0, -1].numpy() for k in ("precision", "scores"))
    curve = pd.DataFrame({"recall": recall, "precision": np.where(precision >= 0, precision, np.nan),
                          "score": np.where(score >= 0, score, np.nan)})
    return DetectionScores(metrics, curve)


def match_image(detections: Detections, truth: torch.Tensor, score_threshold: float,
                iou_threshold: float = 0.5) -> dict[str, float]:
    """One image's TP/FP/FN, F1 and mean matched IoU (see the module docstring)."""
    keep = detections.scores >= score_threshold
    boxes = detections.boxes[keep][detections.scores[keep].argsort(descending=True)]
    iou = box_iou(boxes.float(), truth.float().reshape(-1, 4)) if len(boxes) and len(truth) else torch.zeros(len(boxes), len(truth))
    taken, matched = torch.zeros(len(truth), dtype=torch.bool), []
    for row in iou:
        row = torch.where(taken, torch.full_like(row, -1.0), row)
        if len(row) and row.max() >= iou_threshold:
            taken[row.argmax()] = True
            matched.append(float(row.max()))
    tp, fp, fn = len(matched), len(boxes) - len(matched), len(truth) - len(matched)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1, "mean_iou": float(np.mean(matched)) if matched else 0.0}


def per_image_scores(keys: list[str], predictions: list[Detections], targets: list[torch.Tensor],
                     score_threshold: float) -> pd.DataFrame:
    """:func:`match_image` for every image, one row per key."""
    rows = [{"key": k, **match_image(p, t, score_threshold)} for k, p, t in zip(keys, predictions, targets, strict=True)]
    return pd.DataFrame(rows, columns=["key", "tp", "fp", "fn", "f1", "mean_iou"])


def boxes_from_probability(probability: np.ndarray, threshold: float, min_area: int = 0) -> Detections:
    """A segmenter's map (H×W in [0, 1]) as detections: a box per component of ``probability >= threshold``
    of at least ``min_area`` pixels, scored with its component's mean probability, best first."""
    labels, boxes, areas = components(probability >= threshold)
    sums = np.bincount(labels.ravel(), weights=probability.ravel().astype(np.float64), minlength=len(areas) + 1)[1:]
    scores = (sums / np.maximum(areas, 1)).astype(np.float32)
    keep = np.flatnonzero(areas >= min_area)
    order = keep[np.argsort(-scores[keep], kind="stable")]
    return Detections(torch.from_numpy(boxes[order]), torch.from_numpy(scores[order]))


def pick_cases(per_image: pd.DataFrame, k: int) -> list[tuple[str, int, int]]:
    """(kind, rank, row) of the ``k`` best and ``k`` worst images by F1, then mean IoU (ties by key)."""
    order = per_image.reset_index(drop=True).sort_values(["f1", "mean_iou", "key"], ascending=[False, False, True],
                                                         kind="stable").index
    k = min(k, len(order))
    return [("best", r, int(i)) for r, i in enumerate(order[:k], 1)] + \
           [("worst", r, int(i)) for r, i in enumerate(order[::-1][:k], 1)]


def truth_boxes(mask: np.ndarray, min_area: int) -> torch.Tensor:
    """Ground-truth boxes of one mask at its own resolution: one per connected component of at least ``min_area``
    pixels (``detection.min_box_area``)."""
    return torch.from_numpy(mask_to_boxes(mask, min_area).boxes)


def score_threshold_sweep(predictions: list[Detections], truth: list[torch.Tensor], thresholds: np.ndarray) -> pd.DataFrame:
    """Box F1, precision and recall (matches at IoU 0.5, COCO's rule) at each score threshold."""
    rows = []
    for t in thresholds:
        counts = pd.DataFrame([match_image(p, b, float(t)) for p, b in zip(predictions, truth, strict=True)])
        tp, fp, fn = (int(counts[c].sum()) for c in ("tp", "fp", "fn"))
        rows.append({"threshold": float(t), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
                     "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)})
    return pd.DataFrame(rows)
