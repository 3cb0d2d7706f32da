"""ATSS assignment on hand-made anchors (IoUs, thresholds and positives worked out below), and the anchors."""

from __future__ import annotations

import math

import pytest
import torch

from models.anchors import anchor_grid, boxes_to_distances, distances_to_boxes, expected_distances
from polypflow.train.gfl.atss import atss_assign

pytestmark = pytest.mark.quick


def centres_of(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


# level 1: four 10x10 anchors; level 2: two 40x40 anchors far away (IoU 0 with everything)
ANCHORS = torch.tensor([
    [0, 0, 10, 10],  # a0, centre (5, 5)
    [10, 0, 20, 10],  # a1, centre (15, 5)
    [5, 10, 15, 20],  # a2, centre (10, 15)
    [20, 0, 30, 10],  # a3, centre (25, 5)
    [40, 40, 80, 80],  # b0, centre (60, 60)
    [80, -15, 120, 25],  # b1, centre (100, 5)
], dtype=torch.float32)
COUNTS = (4, 2)


def test_two_boxes_by_hand():
    """topk = 3 (level 2 has only 2 anchors, so 5 candidates per box).

    Box A = [0, 0, 20, 10] (area 200), centre (10, 5): nearest on level 1 a0 (5), a1 (5), a2 (10).
      IoU a0 = 100/200 = 0.5, a1 = 0.5, a2 = 0, b0 = b1 = 0 -> mean 0.2,
      sample std = sqrt((0.3^2 * 2 + 0.2^2 * 3) / 4) = sqrt(0.075) = 0.27386 -> threshold 0.47386:
      a0 and a1 pass, centres (5, 5) and (15, 5) inside A.
    Box B = [10, 0, 22, 10] (area 120), centre (16, 5): nearest a1 (1), a3 (9), a0 (11).
      IoU a1 = 100/120 = 0.83333, a3 = 20/200 = 0.1, a0 = 0, b0 = b1 = 0 -> mean 0.18667,
      sample std = sqrt((0.64667^2 + 0.08667^2 + 3 * 0.18667^2) / 4) = 0.36408 -> threshold 0.55075:
      a1 passes, centre (15, 5) inside B.
    a1 is positive for both; it overlaps B more (0.833 > 0.5), so it goes to B. a0 -> A, the rest background.
    """
    boxes = torch.tensor([[0, 0, 20, 10], [10, 0, 22, 10]], dtype=torch.float32)
    result = atss_assign(ANCHORS, centres_of(ANCHORS), COUNTS, boxes, topk=3)
    assert result.gt_index.tolist() == [0, 1, -1, -1, -1, -1]
    torch.testing.assert_close(result.iou, torch.tensor([0.5, 100 / 120, 0, 0, 0, 0]))
    torch.testing.assert_close(result.thresholds, torch.tensor([0.2 + math.sqrt(0.075), 0.18667 + 0.36408]),
                               atol=1e-4, rtol=0)


def test_candidate_whose_centre_lies_outside_the_box_is_not_positive():
    """Box [0, 0, 10, 10]; topk = 9 on one level of nine 10x10 anchors:
    d0 = [6, 0, 16, 10], centre (11, 5) outside, IoU 40/160 = 0.25;
    d1 = [-4, 0, 6, 10], centre (1, 5) inside, IoU 60/140 = 0.42857; d2..d8 far away, IoU 0.
    mean = 0.67857/9 = 0.07540, sample std = sqrt((0.25^2 + 0.42857^2 - 9 * 0.07540^2) / 8) = 0.15613,
    threshold 0.23153: both reach it, only d1 has its centre inside."""
    far = [[20 + 10 * i, 0, 30 + 10 * i, 10] for i in range(7)]
    anchors = torch.tensor([[6, 0, 16, 10], [-4, 0, 6, 10], *far], dtype=torch.float32)
    result = atss_assign(anchors, centres_of(anchors), (9,), torch.tensor([[0.0, 0, 10, 10]]), topk=9)
    assert result.gt_index.tolist() == [-1, 0] + [-1] * 7
    assert result.thresholds.item() == pytest.approx(0.23153, abs=1e-4)


def test_no_ground_truth_makes_everything_background():
    result = atss_assign(ANCHORS, centres_of(ANCHORS), COUNTS, torch.zeros(0, 4), topk=3)
    assert (result.gt_index == -1).all() and (result.iou == 0).all()


def test_anchor_grid_centres_strides_and_squares():
    grid = anchor_grid([(2, 3), (1, 2)], [8, 16], scale=8)
    assert grid.counts == (6, 2)
    torch.testing.assert_close(grid.centres[:4], torch.tensor([[4.0, 4], [12, 4], [20, 4], [4, 12]]))
    torch.testing.assert_close(grid.centres[6:], torch.tensor([[8.0, 8], [24, 8]]))
    assert grid.strides.tolist() == [8] * 6 + [16] * 2
    torch.testing.assert_close(grid.anchors[0], torch.tensor([-28.0, -28, 36, 36]))  # side 8 x 8
    torch.testing.assert_close(grid.anchors[-1], torch.tensor([-40.0, -56, 88, 72]))  # side 8 x 16


def test_distance_coding_round_trip_and_expectation():
    centres = torch.tensor([[10.0, 10], [3, 4]])
    boxes = torch.tensor([[2.0, 5, 30, 12], [0, 0, 4, 9]])
    torch.testing.assert_close(distances_to_boxes(centres, boxes_to_distances(centres, boxes)), boxes)
    logits = torch.full((1, 4, 5), -1e4)
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 4])] = 0.0  # one-hot distributions
    torch.testing.assert_close(expected_distances(logits), torch.tensor([[0.0, 1, 2, 4]]))
    assert expected_distances(torch.zeros(4, 5)).tolist() == [2.0] * 4  # uniform over 0..4: mean 2
