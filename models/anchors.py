"""Anchor points, square anchors and GFL's edge-distance coding (boxes x1, y1, x2, y2 in pixels, as in
:mod:`polypflow.data.boxes`). Beside the detector that uses them, so ``models`` never imports ``polypflow``.

One anchor per feature-map location (ATSS, Zhang et al. CVPR 2020): centred on the location's pixel
centre ``((j + 0.5) * stride, (i + 0.5) * stride)``, square, side ``scale * stride`` (ATSS's 8). (mmdet
puts centres at ``j * stride``; the half-pixel offset keeps the grid symmetric, so flipping an image
flips its anchors onto anchors.) A box is predicted as its four edge distances from the anchor centre
in units of the level's stride (GFL, Li et al. NeurIPS 2020 / CVPR 2021), each a distribution over
``0..reg_max`` whose expectation is the distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AnchorGrid:
    """All levels' anchors concatenated, level by level, row-major within a level."""

    centres: torch.Tensor  # A×2 (x, y) pixels
    strides: torch.Tensor  # A, the stride of each anchor's level
    anchors: torch.Tensor  # A×4 square anchors (x1, y1, x2, y2)
    counts: tuple[int, ...]  # anchors per level


def anchor_grid(sizes: list[tuple[int, int]], strides: list[int], scale: float = 8.0,
                device: torch.device | None = None) -> AnchorGrid:
    """The anchors of feature maps of ``sizes`` (height, width) at ``strides``."""
    centres, level_strides = [], []
    for (h, w), stride in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([x.reshape(-1), y.reshape(-1)], dim=1))
        level_strides.append(torch.full((h * w,), float(stride), device=device))
    centre, stride = torch.cat(centres), torch.cat(level_strides)
    half = (scale * stride / 2)[:, None]
    return AnchorGrid(centre, stride, torch.cat([centre - half, centre + half], dim=1), tuple(h * w for h, w in sizes))


def expected_distances(box_logits: torch.Tensor) -> torch.Tensor:
    """GFL's integral: the expectation of each edge's softmax distribution, ``(..., 4, reg_max + 1)`` to
    ``(..., 4)`` in stride units."""
    bins = torch.arange(box_logits.shape[-1], device=box_logits.device, dtype=box_logits.dtype)
    return (box_logits.softmax(dim=-1) * bins).sum(dim=-1)


def distances_to_boxes(centres: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Boxes from centres (…×2) and (left, top, right, bottom) distances (…×4), same units."""
    return torch.cat([centres - distances[..., :2], centres + distances[..., 2:]], dim=-1)


def boxes_to_distances(centres: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances of ``boxes`` edges from ``centres`` (negative when outside)."""
    return torch.cat([centres - boxes[..., :2], boxes[..., 2:] - centres], dim=-1)
