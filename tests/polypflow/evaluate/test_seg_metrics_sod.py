"""Toolbox metrics against pysodmetrics itself and hand-computed cases; AUC against scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import py_sod_metrics as sod
import pytest
from sklearn.metrics import roc_auc_score

from polypflow.evaluate.seg_metrics import (binary_metrics, roc_auc, score_image, summarize, toolbox_dice,
                                            toolbox_metrics)

pytestmark = pytest.mark.quick


def blob(seed: int, shape=(48, 56)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (yy - 20) ** 2 + (xx - 25) ** 2 < 120
    prob = np.clip(mask * 0.7 + rng.normal(0.15, 0.2, shape), 0, 1).astype(np.float32)
    return prob, mask


def test_toolbox_matches_pysodmetrics_over_a_dataset():
    """Our per-image figures averaged = pysodmetrics' dataset figures on the same 8-bit maps."""
    sm, em, wfm = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure()
    fm = sod.FmeasureV2({"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False),
                         "iou": sod.IOUHandler(with_dynamic=True, with_adaptive=False)})
    rows, curves = [], {"dice": [], "em": []}
    for seed in range(4):
        prob, mask = blob(seed)
        pred, gt = np.round(prob * 255).astype(np.uint8), mask.astype(np.uint8) * 255
        for metric in (sm, em, wfm, fm):
            metric.step(pred, gt)
        row, curve = toolbox_metrics(prob, mask)
        rows.append(row)
        curves["dice"].append(curve["dice"])
        curves["em"].append(curve["em"])
    ours = summarize(pd.DataFrame(rows), {k: np.mean(v, axis=0) for k, v in curves.items()})
    fm_res = fm.get_results()
    assert ours["sm"] == pytest.approx(sm.get_results()["sm"])
    assert ours["wfm"] == pytest.approx(wfm.get_results()["wfm"])
    assert ours["em_mean"] == pytest.approx(em.get_results()["em"]["curve"].mean())
    assert ours["max_em"] == pytest.approx(em.get_results()["em"]["curve"].max())
    assert ours["em_adp"] == pytest.approx(em.get_results()["em"]["adp"])
    assert ours["tb_dice"] == pytest.approx(fm_res["dice"]["dynamic"].mean())
    assert ours["tb_iou"] == pytest.approx(fm_res["iou"]["dynamic"].mean())
    assert ours["max_dice"] == pytest.approx(fm_res["dice"]["dynamic"].max())


def test_toolbox_dice_alone_is_the_toolbox_meandic():
    for seed in range(3):
        prob, mask = blob(seed)
        assert toolbox_dice(prob, mask) == pytest.approx(toolbox_metrics(prob, mask)[0]["tb_dice"])


def test_toolbox_perfect_prediction_by_hand():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:15] = True  # 50 of 600 pixels
    row, curves = toolbox_metrics(mask.astype(np.float32), mask)
    assert row["sm"] == pytest.approx(1.0) and row["wfm"] == pytest.approx(1.0, abs=1e-6)
    # the 8-bit map is 0/255: every threshold 1..255 gives Dice 1, threshold 0 marks all 600 pixels
    assert curves["dice"][0] == pytest.approx(2 * 50 / (50 + 600))
    assert row["tb_dice"] == pytest.approx((255 + 2 * 50 / 650) / 256)
    assert row["tb_iou"] == pytest.approx((255 + 50 / 600) / 256)
    assert curves["em"][1:] == pytest.approx(600 / 599)  # the toolbox divides by (pixels - 1)


def test_auc_equals_sklearn_with_ties():
    prob, mask = blob(7)
    assert roc_auc(prob, mask) == pytest.approx(roc_auc_score(mask.ravel(), prob.ravel()), abs=1e-12)
    coarse = np.round(prob * 4) / 4  # many ties
    assert roc_auc(coarse, mask) == pytest.approx(roc_auc_score(mask.ravel(), coarse.ravel()), abs=1e-12)
    assert np.isnan(roc_auc(prob, np.zeros_like(mask)))


def test_score_image_agrees_with_binary_metrics_and_sweeps():
    prob, mask = blob(3)
    scores = score_image(prob, mask, threshold=0.5, method_threshold=0.35,
                         pr_thresholds=np.linspace(0, 1, 5), sweep=[0.3, 0.5, 0.7])
    at_half = binary_metrics(prob, mask, 0.5)
    for key, value in at_half.items():
        assert scores.row[key] == pytest.approx(value)
    assert scores.row["dice_at_method_threshold"] == pytest.approx(binary_metrics(prob, mask, 0.35)["dice"])
    assert scores.sweep[1]["dice"] == pytest.approx(at_half["dice"])
    assert scores.sweep[2]["precision"] == pytest.approx(binary_metrics(prob, mask, 0.7)["precision"])
    assert scores.pr.shape == (5, 2) and scores.pr[0, 1] == 1.0  # threshold 0: everything found
    assert {"auc", "sm", "em_mean", "em_adp", "wfm", "tb_dice", "tb_iou"} <= set(scores.row)


def test_inclusive_threshold_in_the_maps_dtype():
    prob = np.array([[0.55, 0.5499999]], np.float32)
    mask = np.array([[1, 1]], bool)
    assert score_image(prob, mask, threshold=0.55).row["recall"] == binary_metrics(prob, mask, 0.55)["recall"] == 0.5
