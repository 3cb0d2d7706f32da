"""Quality Focal Loss, Distribution Focal Loss and GFL's weighted total against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from models.anchors import AnchorGrid
from polypflow.train.gfl.atss import Assignment
from polypflow.train.gfl.losses import distribution_focal_loss, gfl_loss, quality_focal_loss

pytestmark = pytest.mark.quick

LN2, LN5 = math.log(2), math.log(5)


def test_quality_focal_loss_values():
    scores = torch.tensor([0.5, 0.8, 0.3])
    targets = torch.tensor([0.0, 0.6, 0.3])
    # 0.5 vs 0: |0 - 0.5|^2 * -ln(0.5) = 0.25 * 0.693147 = 0.173287
    # 0.8 vs 0.6: 0.2^2 * -(0.6 ln 0.8 + 0.4 ln 0.2) = 0.04 * (0.133886 + 0.643775) = 0.031106
    # a score equal to its target costs nothing
    expected = torch.tensor([0.25 * LN2, 0.04 * -(0.6 * math.log(0.8) + 0.4 * math.log(0.2)), 0.0])
    torch.testing.assert_close(quality_focal_loss(scores, targets), expected)


def test_distribution_focal_loss_values():
    uniform = torch.zeros(1, 3)  # S = (1/3, 1/3, 1/3)
    peaked = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))  # S = (0.25, 0.5, 0.25)
    # y = 0.25 between bins 0 and 1: 0.75 * ln 3 + 0.25 * ln 3 = ln 3
    assert distribution_focal_loss(uniform, torch.tensor([0.25])).item() == pytest.approx(math.log(3))
    # y = 1.5: 0.5 * -ln 0.5 + 0.5 * -ln 0.25 = 1.039721
    assert distribution_focal_loss(peaked, torch.tensor([1.5])).item() == pytest.approx(0.5 * LN2 + 0.5 * 2 * LN2)
    # y = 1 exactly: all weight on bin 1, -ln 0.5
    assert distribution_focal_loss(peaked, torch.tensor([1.0])).item() == pytest.approx(LN2)


def one_image_case(score: float) -> tuple[torch.Tensor, torch.Tensor, AnchorGrid, torch.Tensor, Assignment]:
    """Two anchors at stride 8: a0 centred (8, 8) assigned to the box [0, 0, 16, 16], a1 background.
    a0's edge distributions are uniform over 0..4 bins: expected distance 2 bins = 16 px per edge, so its
    box is [-8, -8, 24, 24] (32 x 32) around the 16 x 16 ground truth."""
    grid = AnchorGrid(torch.tensor([[8.0, 8], [40, 40]]), torch.tensor([8.0, 8]),
                      torch.tensor([[-24.0, -24, 40, 40], [8, 8, 72, 72]]), (2,))
    scores = torch.tensor([[score, 0.1]])
    box_logits = torch.zeros(1, 2, 4, 5)
    truth = torch.tensor([[0.0, 0, 16, 16]])
    assignment = Assignment(torch.tensor([0, -1]), torch.tensor([0.5, 0.0]), torch.tensor([0.3]))
    return scores, box_logits, grid, truth, assignment


def test_gfl_loss_one_positive_by_hand():
    """Positive a0, score 0.5; negative a1, score 0.1.
    IoU of [-8, -8, 24, 24] with [0, 0, 16, 16] = 256 / 1024 = 0.25 (the QFL target); the predicted box
    encloses the truth, so GIoU = IoU = 0.25 and the GIoU loss is 0.75.
    QFL = (0.25^2 * ln 2 + 0.1^2 * -ln 0.9) / 1 positive = 0.043322 + 0.001054 = 0.044375.
    DFL target 16 px / 8 = 1 bin exactly: -ln(1/5) = ln 5 per edge.
    Weight = the positive's score 0.5; normaliser max(0.5, 1) = 1:
    GIoU term 2 * 0.5 * 0.75 = 0.75, DFL term 0.25 * 0.5 * ln 5 = 0.201180; total 0.995555."""
    scores, box_logits, grid, truth, assignment = one_image_case(0.5)
    loss = gfl_loss(scores, box_logits, grid, [truth], [assignment])
    qfl = 0.25 ** 2 * LN2 + 0.01 * -math.log(0.9)
    assert loss.positives == 1
    assert loss.qfl.item() == pytest.approx(qfl, rel=1e-5)
    assert loss.giou.item() == pytest.approx(0.75, rel=1e-5)
    assert loss.dfl.item() == pytest.approx(0.25 * 0.5 * LN5, rel=1e-5)
    assert loss.total.item() == pytest.approx(qfl + 0.75 + 0.125 * LN5, rel=1e-5)


def test_gfl_loss_batch_normalises_by_positives_and_weight_sum():
    """The same image twice with score 0.8: 2 positives, weight sum 1.6 (> 1, so it is the normaliser).
    QFL per image = 0.55^2 * -(0.25 ln 0.8 + 0.75 ln 0.2) + 0.001054 = 0.382016 + 0.001054, summed / 2;
    GIoU = 2 * (0.8 * 0.75 * 2) / 1.6 = 1.5; DFL = 0.25 * (0.8 * ln 5 * 2) / 1.6 = 0.25 ln 5."""
    scores, box_logits, grid, truth, assignment = one_image_case(0.8)
    loss = gfl_loss(scores.repeat(2, 1), box_logits.repeat(2, 1, 1, 1), grid, [truth, truth], [assignment, assignment])
    qfl_image = 0.55 ** 2 * -(0.25 * math.log(0.8) + 0.75 * math.log(0.2)) + 0.01 * -math.log(0.9)
    assert loss.positives == 2
    assert loss.qfl.item() == pytest.approx(2 * qfl_image / 2, rel=1e-5)
    assert loss.giou.item() == pytest.approx(1.5, rel=1e-5)
    assert loss.dfl.item() == pytest.approx(0.25 * LN5, rel=1e-5)


def test_gfl_loss_without_positives_is_qfl_on_negatives_and_has_gradients():
    scores, box_logits, grid, _, _ = one_image_case(0.5)
    scores.requires_grad_(True)
    box_logits.requires_grad_(True)
    background = Assignment(torch.tensor([-1, -1]), torch.zeros(2), torch.zeros(0))
    loss = gfl_loss(scores, box_logits, grid, [torch.zeros(0, 4)], [background])
    # / max(0 positives, 1): 0.5^2 * ln 2 + 0.1^2 * -ln 0.9
    assert loss.qfl.item() == pytest.approx(0.25 * LN2 + 0.01 * -math.log(0.9), rel=1e-5)
    assert loss.dfl.item() == 0 and loss.giou.item() == 0 and loss.positives == 0
    loss.total.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
