"""Every drawing of polypflow's outputs: masks over images, boxes, and best/worst cases (the report's charts are
``polypflow.report.figures``). One palette: prediction red, truth green."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from models.gfl_atss import Detections

PRED_COLOUR, TRUTH_COLOUR = (255, 40, 40), (40, 255, 40)
CASE_HEIGHT = 256  # pixels: a drawn case's height in the evaluation's cases/ and the report


def line_width(image: np.ndarray) -> int:
    """Outline and box width for ``image``: 1 px per 250 px of its longer side."""
    return max(1, round(max(image.shape[:2]) / 250))


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a binary mask, ``width`` pixels thick."""
    mask = mask.astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return (cv2.dilate(mask, kernel) > 0) & ~(cv2.erode(mask, kernel) > 0)


def draw_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """The prediction filled in red (with its outline) over ``image``; ``truth``'s outline in green."""
    out = image.astype(np.float32).copy()
    fill = pred.astype(bool)
    out[fill] = (1 - alpha) * out[fill] + alpha * np.array(PRED_COLOUR, np.float32)
    out = out.astype(np.uint8)
    width = line_width(image)
    out[outline(fill, width)] = PRED_COLOUR
    if truth is not None:
        out[outline(truth.astype(bool), width)] = TRUTH_COLOUR
    return out


def draw_boxes(image: np.ndarray, truth: torch.Tensor, detections: Detections, score_threshold: float) -> np.ndarray:
    """``image`` (H×W×3 uint8) with ground-truth boxes in green and detections scoring at least
    ``score_threshold`` in red, each labelled with its score."""
    out = np.ascontiguousarray(image.copy())
    width = line_width(image)
    for box in truth.reshape(-1, 4).round().int().tolist():
        cv2.rectangle(out, tuple(box[:2]), (box[2] - 1, box[3] - 1), TRUTH_COLOUR, width)
    for box, score in zip(detections.boxes.round().int().tolist(), detections.scores.tolist(), strict=True):
        if score >= score_threshold:
            cv2.rectangle(out, tuple(box[:2]), (box[2] - 1, box[3] - 1), PRED_COLOUR, width)
            cv2.putText(out, f"{score:.2f}", (box[0] + 2, max(box[1] - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35 * width, PRED_COLOUR, max(1, width // 2), cv2.LINE_AA)
    return out


def to_case_height(image: np.ndarray) -> np.ndarray:
    """A drawn case scaled to :data:`CASE_HEIGHT` pixels high (area interpolation)."""
    scale = CASE_HEIGHT / image.shape[0]
    return cv2.resize(image, (round(image.shape[1] * scale), CASE_HEIGHT), interpolation=cv2.INTER_AREA)


def mask_case(image: np.ndarray, truth: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """image | overlay (prediction at ``threshold`` red, truth outline green) at the mask's resolution, scaled to
    :data:`CASE_HEIGHT`; ``prob`` at any size is resized bilinearly to the mask's."""
    full = cv2.resize(prob, truth.shape[::-1], interpolation=cv2.INTER_LINEAR)
    if image.shape[:2] != truth.shape:
        image = cv2.resize(image, truth.shape[::-1], interpolation=cv2.INTER_AREA)
    return to_case_height(np.concatenate([image, draw_overlay(image, full >= threshold, truth)], axis=1))


def box_case(image: np.ndarray, truth: torch.Tensor, detections: Detections, threshold: float) -> np.ndarray:
    """The image with its true boxes and the detections scoring at least ``threshold``, scaled to
    :data:`CASE_HEIGHT`."""
    return to_case_height(draw_boxes(image, truth, detections, threshold))
