"""The detector's one predictor: evaluation, the predict CLI and serving run a trained detector through
:class:`BoxPredictor`.

The same resizing rule as the segmenters' :class:`~polypflow.inference.Predictor`: an image goes to the
model's input size with area interpolation (:func:`polypflow.data.resize_image`, as the training cache does);
the boxes come back to the image's own resolution (x scaled by width / size, y by height / size). Decoding
(score threshold, NMS, at most ``max_detections``) uses the settings the model was trained with
(``meta["decode"]``, from ``detection:`` of params.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.gfl_atss import Detections
from polypflow.data import resize_image
from polypflow.detection.training import predict_boxes

CPU = torch.device("cpu")


def to_image_scale(detections: Detections, size: int, shape: tuple[int, ...]) -> Detections:
    """Boxes predicted at ``size``×``size`` in the coordinates of an image of ``shape`` (H, W, ...)."""
    factor = torch.tensor([shape[1] / size, shape[0] / size] * 2, dtype=torch.float32)
    return Detections(detections.boxes.float() * factor, detections.scores)


@dataclass
class BoxPredictor:
    """A trained detector as boxes: uint8 RGB images of any size in, :class:`Detections` at each image's own
    resolution out (best first); a box counts as found from ``match_score`` (``threshold`` of its metadata)."""

    model: nn.Module
    image_size: int
    normalize: tuple[Sequence[float], Sequence[float]] | str
    match_score: float = 0.3
    score_threshold: float = 0.05
    nms_iou: float = 0.6
    max_detections: int = 100
    device: torch.device = CPU
    batch_size: int = 16
    source: str = ""

    def detect_resized(self, images: np.ndarray) -> list[Detections]:
        """Detections (in model-input pixels) of uint8 images already at the model's size (N×S×S×3)."""
        return predict_boxes(self.model.to(self.device), images, self.normalize, self.device, self.batch_size,
                             self.score_threshold, self.nms_iou, self.max_detections)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of uint8 RGB images of any size, each in its own pixel coordinates."""
        if not len(images):
            return []
        small = np.stack([resize_image(image, self.image_size) for image in images])
        return [to_image_scale(d, self.image_size, image.shape)
                for d, image in zip(self.detect_resized(small), images, strict=True)]

    def found(self, detections: Detections) -> Detections:
        """The boxes that count as found (score >= ``match_score``)."""
        keep = detections.scores >= self.match_score
        return Detections(detections.boxes[keep], detections.scores[keep])


def trained_box_predictor(model: nn.Module, meta: dict, match_score: float | None = None, device: torch.device = CPU,
                          batch_size: int = 16, source: str = "") -> BoxPredictor:
    """The box predictor of a trained detector and its metadata (``polypflow.training.save_trained``)."""
    decode = meta.get("decode", {})
    return BoxPredictor(model.eval(), int(meta["image_size"]), (meta["mean"], meta["std"]),
                        float(meta["threshold"] if match_score is None else match_score),
                        device=device, batch_size=batch_size, source=source, **decode)
