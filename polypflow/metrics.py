"""Per-image segmentation metrics (binary masks, probability maps) and curves over thresholds."""

from __future__ import annotations

import numpy as np

BINARY_METRICS = ["dice", "iou", "precision", "recall", "specificity", "fnr", "accuracy"]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 1.0  # 0/0: nothing to find and nothing found is perfect


def confusion(pred: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int]:
    """TP, FP, FN, TN of boolean ``pred`` against boolean ``mask``."""
    tp = int(np.count_nonzero(pred & mask))
    fp = int(np.count_nonzero(pred & ~mask))
    fn = int(np.count_nonzero(~pred & mask))
    return tp, fp, fn, pred.size - tp - fp - fn


def binary_metrics(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Dice, IoU, precision, recall (sensitivity), specificity, FNR, accuracy at ``threshold``; MAE."""
    gt = mask.astype(bool)
    tp, fp, fn, tn = confusion(prob >= threshold, gt)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "fnr": 1.0 - _ratio(tp, tp + fn),
        "accuracy": (tp + tn) / gt.size,
        "mae": float(np.abs(prob.astype(np.float64) - gt).mean()),
    }


def dice_batch(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-image Dice of a batch N×H×W (vectorised, for validation during training)."""
    pred = prob >= threshold
    gt = mask.astype(bool)
    tp = (pred & gt).sum(axis=(1, 2))
    denom = pred.sum(axis=(1, 2)) + gt.sum(axis=(1, 2))
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def pr_points(prob: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of one image at each threshold."""
    gt = mask.astype(bool)
    precision, recall = np.empty(len(thresholds)), np.empty(len(thresholds))
    for i, t in enumerate(thresholds):
        tp, fp, fn, _ = confusion(prob >= t, gt)
        precision[i], recall[i] = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return precision, recall
