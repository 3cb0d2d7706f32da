"""Per-image segmentation metrics (binary masks, probability maps), curves over thresholds, summaries.

Two families, both per image then averaged over a test set (mDice, mIoU, ...):

* **thresholded** at a fixed threshold (``prob >= t``): Dice, IoU, precision, recall (sensitivity),
  specificity, FNR = FN / (FN + TP), accuracy; plus MAE and AUC-ROC of the probability map. Counts at
  many thresholds come from one sort per image (exact, as ``prob >= t`` would give).
* **the community's evaluation toolbox** (``pysodmetrics``, the Python port of the MATLAB toolbox used
  by PraNet and its successors): the map is scored as the 8-bit image the toolbox reads (min-max
  normalised, ``mapminmax``), the mask binarised at 128. ``tb_dice``/``tb_iou`` are the mean over the
  256 thresholds (the toolbox's ``meanDic``/``meanIoU``), ``sm`` the S-measure (alpha 0.5),
  ``em_mean``/``em_adp`` the mean / adaptive E-measure, ``wfm`` the weighted F-measure (beta 1).
  ``maxEm`` and ``maxDic`` are dataset figures: the maximum of the image-averaged curve.

An empty mask with an empty prediction counts as perfect (Dice 1); AUC-ROC is undefined (NaN, left out
of the mean) on an image whose mask is empty or full.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import py_sod_metrics as sod

BINARY_METRICS = ["dice", "iou", "precision", "recall", "specificity", "fnr", "accuracy"]
TOOLBOX_CURVES = ["dice", "iou", "em"]  # 256 values each, index t = threshold t/255 of the 8-bit map
LEVELS = 256
# the Dice of a model as it ships: binarised at the threshold stored with it (0.5 unless its recipe searched
# one, as CRIS does); the column ranked, plotted, compared and tagged, "dice" staying the protocol's Dice@0.5
MODEL_DICE = "dice_at_method_threshold"


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
    return {**rates(tp, fp, fn, tn), "mae": float(np.abs(prob.astype(np.float64) - gt).mean())}


def rates(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """The thresholded metrics of one confusion matrix."""
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "fnr": 1.0 - _ratio(tp, tp + fn),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
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
    scores = SortedScores(prob, mask)
    rows = [rates(*c) for c in scores.counts(thresholds)]
    return np.array([r["precision"] for r in rows]), np.array([r["recall"] for r in rows])


class SortedScores:
    """One image's probabilities split by ground truth and sorted: exact counts at any threshold."""

    def __init__(self, prob: np.ndarray, mask: np.ndarray) -> None:
        gt = mask.astype(bool)
        self.dtype = prob.dtype
        self.fg = np.sort(prob[gt])  # numpy's SIMD sort: several times faster than a stable one, the same values
        self.bg = np.sort(prob[~gt])

    def counts(self, thresholds: Sequence[float] | np.ndarray) -> list[tuple[int, int, int, int]]:
        """(TP, FP, FN, TN) of ``prob >= t`` for each ``t`` (compared in the map's own dtype)."""
        t = np.asarray(thresholds, dtype=self.dtype)
        tp = len(self.fg) - np.searchsorted(self.fg, t, side="left")
        fp = len(self.bg) - np.searchsorted(self.bg, t, side="left")
        return [(int(a), int(b), len(self.fg) - int(a), len(self.bg) - int(b)) for a, b in zip(tp, fp, strict=True)]

    def auc(self) -> float:
        """Area under the ROC curve (Mann-Whitney U with ties counted half); NaN with one class only."""
        if not len(self.fg) or not len(self.bg):
            return float("nan")
        below = np.searchsorted(self.bg, self.fg, side="left").sum(dtype=np.float64)
        ties = (np.searchsorted(self.bg, self.fg, side="right") - np.searchsorted(self.bg, self.fg, side="left")).sum(dtype=np.float64)
        return float((below + 0.5 * ties) / (len(self.fg) * len(self.bg)))


def roc_auc(prob: np.ndarray, mask: np.ndarray) -> float:
    """AUC-ROC of one probability map against its mask (equals ``sklearn.metrics.roc_auc_score``)."""
    return SortedScores(prob, mask).auc()


def toolbox_inputs(prob: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit prediction and mask images the toolbox reads (the map as written to a PNG)."""
    pred = np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    return pred, mask.astype(bool).astype(np.uint8) * 255


def toolbox_dice(prob: np.ndarray, mask: np.ndarray) -> float:
    """The toolbox's ``meanDic`` of one map alone (:func:`toolbox_metrics`' ``tb_dice``, without its other figures)."""
    fm = sod.FmeasureV2({"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False)})
    fm.step(*sod.utils.prepare_data(*toolbox_inputs(prob, mask)), normalize=False)
    return float(fm.get_results()["dice"]["dynamic"].mean())


def toolbox_metrics(prob: np.ndarray, mask: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The toolbox's per-image figures and curves (ascending threshold) of one map, via pysodmetrics."""
    pred, gt = sod.utils.prepare_data(*toolbox_inputs(prob, mask))  # once, as each step(normalize=True) would
    sm, em, wfm = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure()
    fm = sod.FmeasureV2({"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False),
                         "iou": sod.IOUHandler(with_dynamic=True, with_adaptive=False)})
    for metric in (sm, em, wfm, fm):
        metric.step(pred, gt, normalize=False)
    dynamic = fm.get_results()
    curves = {"dice": np.flip(dynamic["dice"]["dynamic"]), "iou": np.flip(dynamic["iou"]["dynamic"]),
              "em": np.flip(np.asarray(em.changeable_ems[0], dtype=np.float64))}
    scalars = {"tb_dice": float(curves["dice"].mean()), "tb_iou": float(curves["iou"].mean()),
               "sm": float(sm.sms[0]), "em_mean": float(curves["em"].mean()),
               "em_adp": float(em.adaptive_ems[0]), "wfm": float(wfm.weighted_fms[0])}
    return scalars, curves


class ImageScores:
    """Everything measured on one image: the row of ``per_image.csv`` and its curves."""

    def __init__(self, row: dict[str, float], pr: np.ndarray, sweep: list[dict[str, float]], curves: dict[str, np.ndarray]) -> None:
        self.row, self.pr, self.sweep, self.curves = row, pr, sweep, curves


def score_image(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5, method_threshold: float = 0.5,
                pr_thresholds: Sequence[float] = (), sweep: Sequence[float] = ()) -> ImageScores:
    """All per-image metrics of ``prob`` against ``mask``: at ``threshold``, at the method's threshold,
    threshold-free ones (MAE, AUC, toolbox), precision/recall at ``pr_thresholds``, a Dice sweep."""
    gt = mask.astype(bool)
    scores = SortedScores(prob, gt)
    counts = scores.counts([threshold, method_threshold, *pr_thresholds, *sweep])
    at_method = rates(*counts[1])
    row = {**rates(*counts[0]), "dice_at_method_threshold": at_method["dice"],
           "iou_at_method_threshold": at_method["iou"], "mae": float(np.abs(prob.astype(np.float64) - gt).mean()),
           "auc": scores.auc()}
    toolbox, curves = toolbox_metrics(prob, gt)
    row.update(toolbox)
    pr = np.array([[r["precision"], r["recall"]] for r in map(lambda c: rates(*c), counts[2:2 + len(pr_thresholds)])])
    swept = [{"threshold": float(t), **rates(*c)} for t, c in zip(sweep, counts[2 + len(pr_thresholds):], strict=True)]
    return ImageScores(row, pr.reshape(-1, 2), swept, curves)


def summarize(per_image: pd.DataFrame, curves: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Dataset figures: the mean of every per-image metric (NaN-aware), plus ``max_dice``/``max_em``/
    ``max_iou`` (maximum of the image-averaged toolbox curve, as the toolbox reports ``maxDic``/``maxEm``)."""
    numeric = per_image.select_dtypes("number")
    out = {"n": int(len(per_image)), **{k: float(v) for k, v in numeric.mean(skipna=True).items()}}
    for name, curve in (curves or {}).items():
        out[f"max_{name}"] = float(np.max(curve))
    return out
