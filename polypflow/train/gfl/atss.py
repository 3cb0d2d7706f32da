"""Adaptive Training Sample Selection (ATSS; S. Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), for one image.

For every ground-truth box: on each pyramid level, the ``topk`` anchors whose centres are nearest the
box centre are candidates; the box's IoU threshold is the mean plus the standard deviation of its
candidates' IoUs; a candidate is positive when its IoU reaches that threshold and its centre lies
inside the box. An anchor positive for several boxes goes to the one it overlaps most.

As in the authors' code (and mmdet's ``ATSSAssigner``): the standard deviation is the sample one
(``torch.std``, n - 1), and "inside" means every edge distance of the centre exceeds 0.01 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from models.anchors import boxes_to_distances


@dataclass(frozen=True)
class Assignment:
    """Per anchor: the index of its ground-truth box (-1: background) and its IoU with that box (0 for
    background); per ground-truth box, the IoU threshold ATSS derived for it."""

    gt_index: torch.Tensor  # A, long
    iou: torch.Tensor  # A
    thresholds: torch.Tensor  # G


def candidates(centres: torch.Tensor, counts: tuple[int, ...], gt_boxes: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (C×G) of each box's ``topk`` nearest anchors per level (fewer on a level that is smaller)."""
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distance = (centres[:, None] - gt_centres[None]).norm(dim=-1)  # A×G (cdist's matmul path is inexact)
    picks, start = [], 0
    for count in counts:
        k = min(topk, count)
        picks.append(distance[start:start + count].topk(k, dim=0, largest=False).indices + start)
        start += count
    return torch.cat(picks, dim=0)


def atss_assign(anchors: torch.Tensor, centres: torch.Tensor, counts: tuple[int, ...], gt_boxes: torch.Tensor,
                topk: int = 13) -> Assignment:
    """Assign ``anchors`` (A×4, levels concatenated with ``counts`` per level; ``centres`` A×2) to
    ``gt_boxes`` (G×4); G = 0 makes every anchor background. ``topk`` 13 is the EndoCV 2021 entry's
    (METHODS.md section 3), ATSS's own default 9."""
    num_anchors, num_gt = len(anchors), len(gt_boxes)
    background = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0:
        return Assignment(background, anchors.new_zeros(num_anchors), anchors.new_zeros(0))
    iou = box_iou(anchors, gt_boxes)  # A×G
    picked = candidates(centres, counts, gt_boxes, topk)  # C×G
    gt_columns = torch.arange(num_gt, device=anchors.device).expand_as(picked)
    candidate_iou = iou[picked, gt_columns]
    std = candidate_iou.std(dim=0) if len(picked) > 1 else torch.zeros_like(candidate_iou[0])
    thresholds = candidate_iou.mean(dim=0) + std
    inside = boxes_to_distances(centres[picked], gt_boxes[gt_columns]).amin(dim=-1) > 0.01
    positive = (candidate_iou >= thresholds) & inside
    chosen = torch.full_like(iou, -torch.inf)
    chosen[picked[positive], gt_columns[positive]] = iou[picked[positive], gt_columns[positive]]
    best_iou, best_gt = chosen.max(dim=1)
    assigned = best_iou > -torch.inf
    gt_index = torch.where(assigned, best_gt, background)
    return Assignment(gt_index, torch.where(assigned, best_iou, torch.zeros_like(best_iou)), thresholds)
