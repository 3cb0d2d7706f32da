"""The detector's side of training: the loss of a batch, prediction, and the validation score (AP50).

:class:`DetectionTask` bundles what a task-agnostic trainer needs (dataset, collate, loss of a batch,
validation score of the model), so :func:`polypflow.training.fit` can train a detector through it; the
functions below are usable on their own.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from polypflow.config import Recipe
from polypflow.data import ImageSet, to_tensor
from polypflow.detection.atss import atss_assign
from polypflow.detection.data import DetectionDataset, collate_detection, image_boxes
from polypflow.detection.evaluate import coco_metrics
from polypflow.detection.losses import GFLLoss, gfl_loss

ATSS_TOPK = 13  # the EndoCV 2021 entry's k (METHODS.md section 3); the ATSS paper's default is 9


def detection_loss_terms(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor],
                         topk: int = ATSS_TOPK) -> GFLLoss:
    """GFLv2's loss terms for ``images`` (N×3×H×W, normalised) with ground truth ``boxes`` (per image K×4
    pixels), anchors assigned by ATSS with ``topk`` candidates per level."""
    outputs = model(images)
    grid = model.anchors(outputs)
    scores, logits = model.flatten(outputs)
    boxes = [b.to(images.device, torch.float32) for b in boxes]
    assignments = [atss_assign(grid.anchors, grid.centres, grid.counts, b, topk) for b in boxes]
    return gfl_loss(scores.float(), logits.float(), grid, boxes, assignments)


def detection_loss(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor], topk: int = ATSS_TOPK) -> torch.Tensor:
    """The total of :func:`detection_loss_terms`: what the optimiser minimises."""
    return detection_loss_terms(model, images, boxes, topk).total


@torch.no_grad()
def predict_boxes(model: nn.Module, images: np.ndarray, normalize: str, device: torch.device, batch_size: int = 16,
                  score_threshold: float = 0.05, nms_iou: float = 0.6, max_detections: int = 100) -> list:
    """:class:`~models.gfl_atss.Detections` (on the CPU) for each uint8 image of ``images`` (N×H×W×3)."""
    model.eval()
    detections = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size], normalize).to(device)
        outputs = model(x)
        outputs = type(outputs)(*(tuple(o.float() for o in part) for part in outputs))
        found = model.decode(outputs, tuple(x.shape[-2:]), score_threshold, nms_iou, max_detections)
        detections += [type(d)(d.boxes.cpu(), d.scores.cpu()) for d in found]
    return detections


def validation_ap50(model: nn.Module, images: np.ndarray, boxes: list[torch.Tensor], normalize: str = "imagenet",
                    device: torch.device = torch.device("cpu")) -> float:
    """COCO AP at IoU 0.5 of the model's detections on uint8 ``images`` against ``boxes``."""
    return coco_metrics(predict_boxes(model, images, normalize, device), boxes).metrics["ap50"]


def rescale_batch(images: torch.Tensor, boxes: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-scale training: the images resized by ``scale`` (to a multiple of 32) and their boxes with them."""
    if scale == 1.0:
        return images, boxes
    size = max(32, int(round(images.shape[-1] * scale / 32)) * 32)
    factor = size / images.shape[-1]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, [b * factor for b in boxes]


class DetectionTask:
    """What :func:`polypflow.training.fit` needs of a detector: (image, boxes) items with boxes from the augmented
    masks (components below ``min_area`` pixels at the training size are specks), GFLv2's loss with ATSS
    (``topk`` candidates per level), epochs selected on validation AP50."""

    metric = "val_ap50"

    def __init__(self, recipe: Recipe | None = None, min_area: int = 0, topk: int = ATSS_TOPK,
                 match_score: float = 0.3) -> None:
        self.recipe, self.min_area, self.topk, self.match_score = recipe, min_area, topk, match_score

    def dataset(self, data: ImageSet, normalize: str | None = None, augment: str | None = None) -> DetectionDataset:
        return DetectionDataset(data, normalize or self.recipe.normalize, augment or self.recipe.augment, self.min_area)

    @staticmethod
    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return collate_detection(batch)

    def loss(self, model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return detection_loss(model, images, boxes, self.topk)

    def step(self, model: nn.Module, batch, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool,
             epoch: int, scale: float) -> tuple[float, int]:
        """One optimisation step: forward under bf16 autocast when ``amp``, the loss in fp32 (a non-finite loss
        raises before the weights change)."""
        images, boxes = rescale_batch(batch[0].to(device), [b.to(device) for b in batch[1]], scale)
        if self.recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = self.loss(model, images, boxes)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        return loss.item(), len(images)

    def validation_score(self, model: nn.Module, val: ImageSet, normalize: str, device: torch.device) -> float:
        return validation_ap50(model, val.images, image_boxes(val.masks, self.min_area), normalize, device)

    def validate(self, model: nn.Module, val: ImageSet, device: torch.device) -> dict[str, float]:
        score = self.validation_score(model, val, self.recipe.normalize, device) if len(val.keys) else 0.0
        return {"val_ap50": score if np.isfinite(score) else 0.0}

    def select(self, metrics: dict[str, float]) -> float:
        return metrics[self.metric]

    def threshold(self, model: nn.Module, train: ImageSet, device: torch.device) -> float:
        """A detector's threshold: the score from which a box counts (``detection.match_score``)."""
        return self.match_score
