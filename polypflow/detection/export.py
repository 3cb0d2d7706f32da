"""ONNX export of a detector: decoding inside the graph, NMS outside it.

The graph (:class:`DetectionGraph`) takes an RGB batch in [0, 1] (normalisation inside, as
:class:`polypflow.onnx_export.ProbabilityHead` does) and returns, for every anchor, the decoded box
``boxes`` (N×A×4, x1 y1 x2 y2 pixels, clipped to the image) and its joint score ``scores`` (N×A), before
any thresholding or NMS: fixed shapes, a dynamic batch, nothing data-dependent in the graph. NMS runs
after it, in :func:`models.gfl_atss.postprocess` (score threshold, top 1000, torchvision NMS, top
``max_detections``): the same function serves PyTorch and ONNX Runtime outputs, so parity is compared on
the same post-processing. (ONNX's ``NonMaxSuppression`` exists, but per-image variable-length outputs
with a dynamic batch would need a padded or flattened-index output every consumer re-parses.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.gfl_atss import Detections, postprocess
from polypflow.io import atomic_path
from polypflow.onnx_export import onnx_session


class DetectionGraph(nn.Module):
    """The deployable detector: RGB batch in [0, 1] -> (boxes N×A×4, scores N×A) before NMS."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model((image - self.mean) / self.std)
        return self.model.boxes(outputs, (image.shape[-2], image.shape[-1]))


def export_detector_onnx(model: nn.Module, path: Path | str, image_size: int, opset: int = 18,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path:
    """Write the detector's :class:`DetectionGraph` as ONNX to ``path`` atomically (dynamo exporter, dynamic
    batch, fixed ``image_size``: the anchors are laid out for it)."""
    graph = DetectionGraph(model, mean, std).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path, suffix=".onnx") as tmp:
        program = torch.onnx.export(
            graph, (torch.rand(2, 3, image_size, image_size),), dynamo=True, opset_version=opset,
            input_names=["image"], output_names=["boxes", "scores"], dynamic_shapes={"image": {0: batch}},
            external_data=False, verbose=False,
        )
        program.save(str(tmp))
    return Path(path)


def detector_parity(model: nn.Module, path: Path | str, image_size: int, batch: int = 3, seed: int = 0,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    score_threshold: float = 0.05, nms_iou: float = 0.6, max_detections: int = 100) -> dict[str, float]:
    """PyTorch against ONNX Runtime on random input: the largest difference of the raw boxes and scores,
    and after the same post-processing of both, whether the detections agree (count, boxes, scores)."""
    image = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        boxes, scores = DetectionGraph(model, mean, std).eval()(image)
    got_boxes, got_scores = (torch.from_numpy(a) for a in onnx_session(path).run(None, {"image": image.numpy()}))
    post = lambda b, s: postprocess(b, s, score_threshold, nms_iou, max_detections)  # noqa: E731
    expected = [post(b, s) for b, s in zip(boxes, scores)]
    got = [post(b, s) for b, s in zip(got_boxes, got_scores)]
    same_count = all(len(e.boxes) == len(g.boxes) for e, g in zip(expected, got))
    return {
        "raw_boxes_max_abs": float((boxes - got_boxes).abs().max()),
        "raw_scores_max_abs": float((scores - got_scores).abs().max()),
        "detections": sum(len(e.boxes) for e in expected),
        "same_count": same_count,
        "boxes_max_abs": _max_abs(expected, got, "boxes") if same_count else float("inf"),
        "scores_max_abs": _max_abs(expected, got, "scores") if same_count else float("inf"),
    }


def _max_abs(expected: list[Detections], got: list[Detections], field: str) -> float:
    diffs = [(getattr(e, field) - getattr(g, field)).abs().max().item() for e, g in zip(expected, got) if len(e.boxes)]
    return float(np.max(diffs)) if diffs else 0.0
