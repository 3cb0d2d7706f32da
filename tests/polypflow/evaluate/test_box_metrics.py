"""COCO metrics through torchmetrics on hand-made cases, per-image matching, boxes from a map (drawing: test_viz)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models.gfl_atss import Detections
from polypflow.evaluate.box_metrics import (
    boxes_from_probability,
    coco_metrics,
    match_image,
    per_image_scores,
    pick_cases,
    score_threshold_sweep,
    truth_boxes,
)

pytestmark = pytest.mark.quick

TRUTH = [torch.tensor([[10.0, 10, 110, 110]]), torch.tensor([[0.0, 0, 50, 40], [60, 60, 90, 100]])]


def detections(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores))


def test_perfect_predictions_score_one():
    scores = coco_metrics([detections(t.tolist(), [0.9] * len(t)) for t in TRUTH], TRUTH)
    assert scores.metrics == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "ar100": 1.0}
    assert len(scores.pr_curve) == 101 and (scores.pr_curve["precision"] == 1.0).all()


def test_shifted_box_passes_iou_050_but_not_075():
    """Truth [0, 0, 100, 100], prediction shifted 20 px right: IoU = 80 x 100 / (120 x 100) = 0.667.
    It is a hit at IoU thresholds 0.50, 0.55, 0.60, 0.65 and a miss at 0.70..0.95: AP50 1, AP75 0,
    AP = 4/10 = 0.4."""
    truth = [torch.tensor([[0.0, 0, 100, 100]])]
    scores = coco_metrics([detections([[20, 0, 120, 100]], [0.8])], truth)
    assert scores.metrics["ap50"] == pytest.approx(1.0)
    assert scores.metrics["ap75"] == pytest.approx(0.0)
    assert scores.metrics["ap"] == pytest.approx(0.4)


def test_images_without_truth_or_detections_take_no_part_and_a_false_positive_halves_ap50():
    """Adding an empty image with no detection leaves the metrics alone. A detection on an empty image
    scoring above the true one: at recall 1 the precision is 1/2, the interpolated precision is 1/2 at every
    recall point, so AP50 = 0.5."""
    truth, hit = [torch.tensor([[0.0, 0, 100, 100]])], detections([[0, 0, 100, 100]], [0.8])
    empty = torch.zeros(0, 4)
    assert coco_metrics([hit, detections([], [])], [*truth, empty]).metrics["ap50"] == pytest.approx(1.0)
    with_fp = coco_metrics([hit, detections([[5, 5, 30, 30]], [0.9])], [*truth, empty])
    assert with_fp.metrics["ap50"] == pytest.approx(0.5)
    assert with_fp.pr_curve["precision"].to_numpy() == pytest.approx(np.full(101, 0.5))


def test_a_set_without_any_truth_has_undefined_ap():
    metrics = coco_metrics([detections([], [])], [torch.zeros(0, 4)]).metrics
    assert all(math.isnan(v) for v in metrics.values())


def test_match_image_counts_and_f1():
    """Truth: A [0, 0, 50, 40], B [60, 60, 90, 100]. Detections by score: A exactly (0.9), A again (0.8, a
    duplicate: A is taken, so a false positive), a box elsewhere (0.7, FP), B (0.2, below the threshold 0.5).
    TP 1, FP 2, FN 1: F1 = 2 / (2 + 2 + 1) = 0.4."""
    found = detections([[0, 0, 50, 40], [1, 0, 50, 40], [200, 200, 220, 220], [60, 60, 90, 100]], [0.9, 0.8, 0.7, 0.2])
    result = match_image(found, TRUTH[1], score_threshold=0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 2, 1)
    assert result["f1"] == pytest.approx(0.4) and result["mean_iou"] == pytest.approx(1.0)
    assert match_image(detections([], []), torch.zeros(0, 4), 0.5)["f1"] == 1.0


def test_per_image_scores_and_case_picks():
    found = [detections(TRUTH[0].tolist(), [0.9]), detections([], [])]
    table = per_image_scores(["a/1", "a/2"], found, TRUTH, score_threshold=0.3)
    assert table["f1"].tolist() == [1.0, 0.0]
    assert pick_cases(table, 1) == [("best", 1, 0), ("worst", 1, 1)]
    assert pick_cases(pd.DataFrame(columns=table.columns), 3) == []


def test_boxes_from_probability_scores_each_component_by_its_mean():
    prob = np.zeros((30, 30), np.float32)
    prob[2:6, 3:9] = 0.9  # 24 px at 0.9
    prob[10:20, 10:12] = 0.6  # 20 px at 0.6 ...
    prob[10, 10] = 0.99  # ... one of them at 0.99: mean (19 x 0.6 + 0.99) / 20 = 0.6195
    prob[25, 25] = 0.8  # a 1 px speck
    found = boxes_from_probability(prob, threshold=0.5, min_area=2)
    torch.testing.assert_close(found.boxes, torch.tensor([[3.0, 2, 9, 6], [10, 10, 12, 20]]))
    torch.testing.assert_close(found.scores, torch.tensor([0.9, 0.6195]))
    empty = boxes_from_probability(np.zeros((8, 8), np.float32), threshold=0.5)
    assert empty.boxes.shape == (0, 4) and empty.scores.shape == (0,)


def test_score_threshold_sweep_counts_matches_over_the_set():
    """The detections of test_match_image on an image with A and B, plus an image with neither: at 0.1 every
    box counts (TP A and B, FP the duplicate and the box elsewhere: F1 4/6), at 0.5 as in test_match_image
    (F1 0.4), at 0.95 none (F1, precision and recall 0)."""
    found = detections([[0, 0, 50, 40], [1, 0, 50, 40], [200, 200, 220, 220], [60, 60, 90, 100]], [0.9, 0.8, 0.7, 0.2])
    sweep = score_threshold_sweep([found, detections([], [])], [TRUTH[1], torch.zeros(0, 4)], np.array([0.1, 0.5, 0.95]))
    assert list(sweep.columns) == ["threshold", "f1", "precision", "recall"]
    assert sweep["threshold"].tolist() == [0.1, 0.5, 0.95]
    assert sweep["f1"].tolist() == pytest.approx([4 / 6, 0.4, 0.0])
    assert sweep["precision"].tolist() == pytest.approx([0.5, 1 / 3, 0.0])
    assert sweep["recall"].tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_truth_boxes_are_the_components_of_at_least_min_area():
    mask = np.zeros((30, 30), np.uint8)
    mask[2:6, 3:9] = 1
    mask[25, 25] = 1  # a 1 px speck
    torch.testing.assert_close(truth_boxes(mask, min_area=2).float(), torch.tensor([[3.0, 2, 9, 6]]))
    assert len(truth_boxes(mask, min_area=1)) == 2 and truth_boxes(np.zeros((8, 8), np.uint8), 1).shape == (0, 4)
