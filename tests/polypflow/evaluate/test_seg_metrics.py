"""Per-image metrics checked by hand on small arrays, the empty-mask conventions, and the PR curve."""

from __future__ import annotations

import numpy as np
import pytest

from polypflow.evaluate.seg_metrics import BINARY_METRICS, binary_metrics, confusion, dice_batch, pr_points

pytestmark = pytest.mark.quick


def crafted() -> tuple[np.ndarray, np.ndarray]:
    """4x4: the mask covers 6 pixels, the prediction (p >= 0.5) covers 5, of which 4 are right.

    TP = 4, FP = 1, FN = 2, TN = 9.
    """
    mask = np.array([[1, 1, 1, 0],
                     [1, 1, 1, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]], np.uint8)
    prob = np.array([[0.9, 0.8, 0.2, 0.1],
                     [0.7, 0.5, 0.4, 0.6],
                     [0.0, 0.0, 0.3, 0.0],
                     [0.0, 0.0, 0.0, 0.0]], np.float32)
    return prob, mask


def test_confusion_counts():
    prob, mask = crafted()
    assert confusion(prob >= 0.5, mask.astype(bool)) == (4, 1, 2, 9)


def test_binary_metrics_by_hand():
    prob, mask = crafted()
    m = binary_metrics(prob, mask)
    assert set(m) == {*BINARY_METRICS, "mae"}
    assert m["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # 8/11
    assert m["iou"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(9 / 10)
    assert m["fnr"] == pytest.approx(2 / 6)
    assert m["accuracy"] == pytest.approx(13 / 16)
    # |p - gt| summed: inside 0.1+0.2+0.8+0.3+0.5+0.6 = 2.5, outside 0.1+0.6+0.3 = 1.0
    assert m["mae"] == pytest.approx(3.5 / 16)


def test_threshold_is_inclusive_and_moves_the_prediction():
    prob, mask = crafted()
    assert binary_metrics(prob, mask, threshold=0.5)["recall"] == pytest.approx(4 / 6)  # 0.5 counts
    high = binary_metrics(prob, mask, threshold=0.75)  # only 0.9 and 0.8 remain: TP 2, FP 0
    assert high["precision"] == 1.0 and high["recall"] == pytest.approx(2 / 6)
    assert high["mae"] == binary_metrics(prob, mask)["mae"]  # MAE does not depend on the threshold


def test_dice_iou_relation_holds():
    rng = np.random.default_rng(0)
    for _ in range(5):
        prob, mask = rng.random((8, 8)), rng.random((8, 8)) > 0.6
        m = binary_metrics(prob, mask)
        assert m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]))
        assert m["recall"] + m["fnr"] == pytest.approx(1.0)


def test_perfect_and_inverted_predictions():
    _, mask = crafted()
    perfect = binary_metrics(mask.astype(np.float32), mask)
    assert all(perfect[k] == 1.0 for k in BINARY_METRICS if k != "fnr")
    assert perfect["fnr"] == 0.0 and perfect["mae"] == 0.0
    inverted = binary_metrics(1.0 - mask.astype(np.float32), mask)
    assert inverted["dice"] == inverted["iou"] == inverted["accuracy"] == 0.0
    assert inverted["fnr"] == 1.0 and inverted["mae"] == 1.0


def test_empty_mask_conventions():
    empty = np.zeros((4, 4), np.uint8)
    nothing = binary_metrics(np.zeros((4, 4)), empty)  # nothing to find, nothing found: perfect
    assert nothing["dice"] == nothing["iou"] == nothing["precision"] == nothing["recall"] == 1.0
    assert nothing["specificity"] == nothing["accuracy"] == 1.0 and nothing["fnr"] == 0.0
    false_alarm = np.zeros((4, 4))
    false_alarm[0, :2] = 0.9  # 2 false positives on an empty mask
    m = binary_metrics(false_alarm, empty)
    assert m["dice"] == m["iou"] == m["precision"] == 0.0
    assert m["recall"] == 1.0 and m["fnr"] == 0.0  # no polyp pixel was missed
    assert m["specificity"] == pytest.approx(14 / 16) and m["accuracy"] == pytest.approx(14 / 16)
    missed = binary_metrics(np.zeros((4, 4)), np.ones((4, 4), np.uint8))  # all polyp, nothing found
    assert missed["dice"] == missed["recall"] == 0.0 and missed["fnr"] == 1.0
    assert missed["precision"] == 1.0 and missed["specificity"] == 1.0  # no prediction, no negative pixel


def test_dice_batch_equals_per_image_binary_metrics():
    rng = np.random.default_rng(1)
    prob = rng.random((6, 16, 16)).astype(np.float32)
    mask = (rng.random((6, 16, 16)) > 0.7).astype(np.uint8)
    mask[0] = 0  # empty mask, prediction not empty
    mask[1], prob[1] = 0, 0.1  # empty mask, empty prediction
    prob[2] = 0.0  # non-empty mask, empty prediction
    for threshold in (0.3, 0.5, 0.8):
        expected = [binary_metrics(p, m, threshold)["dice"] for p, m in zip(prob, mask, strict=True)]
        np.testing.assert_allclose(dice_batch(prob, mask, threshold), expected, rtol=1e-12)
    assert dice_batch(prob, mask)[1] == 1.0 and dice_batch(prob, mask)[0] == 0.0


def test_pr_points_by_hand_and_monotone_recall():
    prob, mask = crafted()
    thresholds = np.array([0.05, 0.5, 0.75, 0.95])
    precision, recall = pr_points(prob, mask, thresholds)
    # 0.05: predicted {0.9,0.8,0.2,0.1,0.7,0.5,0.4,0.6,0.3} = 9 px, TP 6
    np.testing.assert_allclose(precision, [6 / 9, 4 / 5, 2 / 2, 1.0])
    np.testing.assert_allclose(recall, [6 / 6, 4 / 6, 2 / 6, 0 / 6])
    rng = np.random.default_rng(2)
    prob, mask = rng.random((32, 32)), rng.random((32, 32)) > 0.5
    _, recall = pr_points(prob, mask, np.linspace(0, 1, 21))
    assert np.all(np.diff(recall) <= 0) and recall[0] == 1.0  # raising the threshold never finds more
