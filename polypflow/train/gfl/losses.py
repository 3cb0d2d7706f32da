"""Generalized Focal Loss (X. Li et al., NeurIPS 2020; GFLv2, X. Li et al., CVPR 2021) for one class.

* **Quality Focal Loss** on the joint score ``s`` (class probability times localisation quality, a
  probability already, so no sigmoid here): ``QFL = -|y - s|^beta ((1 - y) log(1 - s) + y log s)``
  with ``y`` the IoU of the positive's decoded box with its ground truth (0 for negatives), summed
  over all anchors and divided by the number of positives (at least 1).
* **Distribution Focal Loss** on each edge's distribution over ``0..reg_max``: for a target distance
  ``y`` between bins ``i`` and ``i + 1``, ``DFL = -((i + 1 - y) log S_i + (y - i) log S_(i+1))``.
* **GIoU loss** (torchvision) of the decoded boxes.

DFL (averaged over the four edges) and GIoU are weighted per positive by its predicted joint score
(detached) and divided by the sum of those weights, clamped to at least 1 as mmdet's ``GFLHead`` does;
the loss weights are GFL's: QFL 1, DFL 0.25, GIoU 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from models.anchors import AnchorGrid, boxes_to_distances, distances_to_boxes, expected_distances
from polypflow.train.gfl.atss import Assignment, atss_assign

QFL_WEIGHT, DFL_WEIGHT, GIOU_WEIGHT = 1.0, 0.25, 2.0


def quality_focal_loss(scores: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Element-wise QFL of probabilities ``scores`` against soft targets ``targets`` in [0, 1]."""
    bce = F.binary_cross_entropy(scores, targets, reduction="none")
    return (targets - scores).abs().pow(beta) * bce


def distribution_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row DFL of distribution ``logits`` (P×(reg_max+1)) at continuous ``targets`` (P, in
    [0, reg_max))."""
    left = targets.long()
    weight_right = targets - left.float()
    return (F.cross_entropy(logits, left, reduction="none") * (1 - weight_right)
            + F.cross_entropy(logits, left + 1, reduction="none") * weight_right)


@dataclass(frozen=True)
class GFLLoss:
    """The weighted loss terms of a batch and the number of positive anchors they came from."""

    qfl: torch.Tensor
    dfl: torch.Tensor
    giou: torch.Tensor
    positives: int

    @property
    def total(self) -> torch.Tensor:
        return self.qfl + self.dfl + self.giou


def gfl_loss(scores: torch.Tensor, box_logits: torch.Tensor, grid: AnchorGrid, gt_boxes: list[torch.Tensor],
             assignments: list[Assignment]) -> GFLLoss:
    """GFLv2's loss for a batch: ``scores`` N×A joint scores, ``box_logits`` N×A×4×(reg_max+1), the
    anchors, and per image its ground-truth boxes and ATSS assignment."""
    reg_max = box_logits.shape[-1] - 1
    positive = torch.stack([a.gt_index >= 0 for a in assignments])  # N×A
    image, anchor = positive.nonzero(as_tuple=True)
    targets = torch.cat([gt_boxes[n][assignments[n].gt_index[positive[n]]] for n in range(len(assignments))])
    centres, strides = grid.centres[anchor], grid.strides[anchor][:, None]
    logits = box_logits[image, anchor]  # P×4×(reg_max+1)
    boxes = distances_to_boxes(centres, expected_distances(logits) * strides)
    quality = torch.zeros_like(scores)
    if len(anchor):
        quality[image, anchor] = box_iou(boxes.detach(), targets).diagonal().clamp(min=0)
    qfl = quality_focal_loss(scores, quality).sum() / max(len(anchor), 1)
    weight = scores.detach()[image, anchor]
    normaliser = weight.sum().clamp(min=1.0)
    giou = (generalized_box_iou_loss(boxes, targets, reduction="none") * weight).sum() / normaliser
    edge_targets = (boxes_to_distances(centres, targets) / strides).clamp(0, reg_max - 0.01)
    dfl = distribution_focal_loss(logits.reshape(-1, reg_max + 1), edge_targets.reshape(-1)).view(-1, 4).mean(dim=1)
    dfl = (dfl * weight).sum() / normaliser
    return GFLLoss(QFL_WEIGHT * qfl, DFL_WEIGHT * dfl, GIOU_WEIGHT * giou, len(anchor))


def detection_loss_terms(model: nn.Module, outputs: object, boxes: list[torch.Tensor], topk: int) -> GFLLoss:
    """GFLv2's loss terms of a detector's ``outputs`` (its forward of a batch) against the ground-truth ``boxes``
    (per image K×4 pixels): anchors assigned by ATSS with ``topk`` candidates per pyramid level
    (``detection.atss_topk``), scores and box distributions in fp32."""
    grid = model.anchors(outputs)
    scores, logits = model.flatten(outputs)
    boxes = [b.to(scores.device, torch.float32) for b in boxes]
    assignments = [atss_assign(grid.anchors, grid.centres, grid.counts, b, topk) for b in boxes]
    return gfl_loss(scores.float(), logits.float(), grid, boxes, assignments)
