"""Box targets from masks, Kvasir-SEG's own boxes, and how the two agree.

Box coordinates everywhere in polypflow are continuous pixel coordinates
``(x1, y1, x2, y2)`` with pixel ``(row i, column j)`` covering ``[j, j + 1) x [i, i + 1)``: a
component whose leftmost column is 3 and rightmost is 7 has ``x1 = 3, x2 = 8`` (``x2`` exclusive), so
``x2 - x1`` is its width in pixels, a flip maps ``x`` to ``W - x`` exactly, and resizing by ``s``
multiplies every coordinate by ``s``.

Kvasir-SEG's ``kavsir_bboxes.json`` differs by one pixel on two edges: its ``xmin``/``ymin`` is the
last background column/row before the polyp (ours minus 1), its ``xmax``/``ymax`` the first
background column/row after it (equal to our exclusive ``x2``/``y2``). :func:`read_kvasir_boxes`
reads the numbers as they are; :func:`summarise_matches` reports the offsets it finds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from polypflow.data.images import ImageSet, SegDataset, read_mask, to_tensor

log = logging.getLogger(__name__)
EDGES = ("x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class MaskBoxes:
    """The boxes of one mask: ``boxes`` (K×4 float32, x1 y1 x2 y2) and the pixel ``areas`` of their
    components, with how many components were dropped as smaller than ``min_area`` or degenerate."""

    boxes: np.ndarray
    areas: np.ndarray
    dropped_small: int
    dropped_degenerate: int


def drop_degenerate(boxes: np.ndarray) -> tuple[np.ndarray, int]:
    """``boxes`` without those of zero (or negative) width or height, and how many were dropped."""
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], int((~keep).sum())


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-connected components of binary ``mask`` (H×W, nonzero is polyp): the label map (0 is
    background, k = 1..K a component), and the box (K×4 float32) and pixel area (K) of components 1..K."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    x, y, w, h, area = (stats[1:, i] for i in range(5))  # row 0 is the background
    return labels, np.stack([x, y, x + w, y + h], axis=1).astype(np.float32).reshape(-1, 4), area.astype(np.int64)


def mask_to_boxes(mask: np.ndarray, min_area: int = 0) -> MaskBoxes:
    """One box per 8-connected component of binary ``mask`` (H×W, nonzero is polyp), sorted by area,
    largest first; components of fewer than ``min_area`` pixels are dropped (JPEG specks), and so is
    a degenerate box (impossible for a component in these coordinates, kept as a guard). An empty mask
    gives zero boxes."""
    _, boxes, area = components(mask)
    large = area >= min_area
    boxes, area = boxes[large], area[large]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    order = np.argsort(-area[keep], kind="stable")
    result = MaskBoxes(boxes[keep][order], area[keep][order], int((~large).sum()), int((~keep).sum()))
    if result.dropped_degenerate:
        log.warning("mask_to_boxes: dropped %d degenerate box(es)", result.dropped_degenerate)
    return result


def read_kvasir_boxes(path: Path | str) -> dict[str, np.ndarray]:
    """``kavsir_bboxes.json`` as ``{image id: boxes K×4 float32 (xmin, ymin, xmax, ymax)}``, numbers as
    the file has them (see the module docstring for how they relate to ours)."""
    entries = json.loads(Path(path).read_text())
    return {
        key: np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in entry["bbox"]], np.float32).reshape(-1, 4)
        for key, entry in entries.items()
    }


@dataclass(frozen=True)
class BoxMatch:
    """One image's one-to-one matching: ``pairs`` (M×2 indices into ours, theirs), their IoUs, and the
    counts of boxes on each side."""

    pairs: np.ndarray
    ious: np.ndarray
    ours: int
    theirs: int


def match_boxes(ours: np.ndarray, theirs: np.ndarray, min_iou: float = 0.5) -> BoxMatch:
    """Hungarian matching maximising the total IoU; pairs below ``min_iou`` are left unmatched."""
    if len(ours) == 0 or len(theirs) == 0:
        return BoxMatch(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), len(ours), len(theirs))
    iou = box_iou(torch.as_tensor(ours), torch.as_tensor(theirs)).numpy()
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] >= min_iou
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    return BoxMatch(pairs, iou[rows[keep], cols[keep]].astype(np.float32), len(ours), len(theirs))


def summarise_matches(matches: dict[str, BoxMatch], ours: dict[str, np.ndarray],
                      theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """How two sets of boxes of the same images agree: counts, the fraction of each side matched, the
    mean/median/min IoU of matched pairs, images whose box counts differ, and the mean and median
    offset (ours minus theirs, pixels) of each edge over matched pairs."""
    ious = np.concatenate([m.ious for m in matches.values()]) if matches else np.zeros(0)
    offsets = [ours[k][m.pairs[:, 0]] - theirs[k][m.pairs[:, 1]] for k, m in matches.items()]
    offsets = np.concatenate(offsets) if offsets else np.zeros((0, 4))
    n_ours, n_theirs = sum(m.ours for m in matches.values()), sum(m.theirs for m in matches.values())
    summary = {
        "images": len(matches), "ours": n_ours, "theirs": n_theirs, "matched": len(ious),
        "fraction_theirs_matched": len(ious) / max(n_theirs, 1), "fraction_ours_matched": len(ious) / max(n_ours, 1),
        "mean_iou": float(ious.mean()) if len(ious) else float("nan"),
        "median_iou": float(np.median(ious)) if len(ious) else float("nan"),
        "min_iou": float(ious.min()) if len(ious) else float("nan"),
        "images_count_differs": sum(m.ours != m.theirs for m in matches.values()),
    }
    for i, edge in enumerate(EDGES):
        summary[f"mean_offset_{edge}"] = float(offsets[:, i].mean()) if len(offsets) else float("nan")
        summary[f"median_offset_{edge}"] = float(np.median(offsets[:, i])) if len(offsets) else float("nan")
    return summary


def kvasir_agreement(root: Path | str, min_area: int, mask_threshold: int = 127,
                     min_iou: float = 0.5) -> tuple[dict[str, BoxMatch], dict[str, float]]:
    """Our boxes (from ``root/masks/<id>.jpg`` binarised at ``mask_threshold``) against Kvasir-SEG's own
    ``root/kavsir_bboxes.json``: the per-image matches and their :func:`summarise_matches` summary."""
    root = Path(root)
    theirs = read_kvasir_boxes(root / "kavsir_bboxes.json")
    ours = {key: mask_to_boxes(read_mask(root / "masks" / f"{key}.jpg", mask_threshold), min_area).boxes
            for key in theirs}
    matches = {key: match_boxes(ours[key], theirs[key], min_iou) for key in theirs}
    return matches, summarise_matches(matches, ours, theirs)


# ---------------------------------------------------------------- training items: boxes from augmented masks

def image_boxes(masks: np.ndarray, min_area: int) -> list[torch.Tensor]:
    """The boxes (K×4 float32 tensors) of each mask of ``masks`` (N×H×W)."""
    return [torch.from_numpy(mask_to_boxes(mask, min_area).boxes) for mask in masks]


class DetectionDataset(SegDataset):
    """(image 3×S×S float, boxes K×4 float32) from an :class:`ImageSet`, boxes from the (augmented) mask;
    components below ``min_area`` pixels (at the cached size) are not boxes."""

    def __init__(self, data: ImageSet, normalize: str, augment: str = "none", min_area: int = 0) -> None:
        super().__init__(data, normalize, augment)
        self.min_area = min_area

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.augmented(i)
        return to_tensor(image, self.normalize), torch.from_numpy(mask_to_boxes(mask, self.min_area).boxes)


def collate_detection(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack the images (N×3×S×S); keep the boxes as a list (their counts differ)."""
    return torch.stack([image for image, _ in batch]), [boxes for _, boxes in batch]
