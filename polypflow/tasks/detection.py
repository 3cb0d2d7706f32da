"""Detection: polyp boxes per image, the other half of the EndoCV 2021 entry (METHODS.md section 3): one-stage
ATSS + Generalized Focal Loss v2 on a feature pyramid over a timm encoder (``models/gfl_atss.py``).

Targets are the boxes of the masks' connected components (``polypflow.data.boxes``; training boxes come from the
*augmented* mask, so they are exact under every augmentation), so every dataset and split has boxes. Epochs are
selected on validation AP50 (COCO's, ``polypflow.evaluate.box_metrics``); the model ships with
``detection.match_score`` as its threshold (a box counts as found from that score) and decodes with
``detection.score_threshold``/``nms_iou``/``max_detections`` as it was trained. A test set is scored by COCO
AP/AP50/AP75/AR100, its PR curve at IoU 0.5, box F1 over score thresholds and per-image matches; cases are
drawn with their boxes. The ONNX graph decodes every anchor's box and score; NMS follows it in
``models.gfl_atss.postprocess``, the same function PyTorch predictions go through.

What is ours and what is maintained library code: the GFLv2 head and DGQP (``models/gfl_atss.py``), ATSS
assignment (``polypflow/train/gfl/atss.py``), Quality/Distribution Focal Loss (``polypflow/train/gfl/losses.py``)
and anchors (``models/anchors.py``) are ours; the encoder (timm), FPN, box IoU, GIoU, NMS (torchvision), connected
components (OpenCV), COCO AP (torchmetrics on pycocotools) are not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.gfl_atss import Detections
from polypflow.data.boxes import DetectionDataset, collate_detection, image_boxes
from polypflow.data.images import ImageSet, load_image_set, read_facts, read_image, read_mask
from polypflow.evaluate.box_metrics import (coco_metrics, per_image_scores, pick_cases, score_threshold_sweep,
                                            truth_boxes)
from polypflow.evaluate.runner import Scorer, Source, TestSetScores, json_number, mask_shapes, rows_of, sweep_thresholds
from polypflow.infer.device import CPU
from polypflow.infer.onnx import DeployGraph, anchor_boxes, detector_parity, export_onnx, onnx_session, quantize_int8
from polypflow.infer.predictor import BoxBackend, Decoding, OnnxBoxBackend, Predictor, trained_predictor
from polypflow.infer.temporal import Smoothing
from polypflow.io import write_png
from polypflow.settings.config import Params, Recipe
from polypflow.train.gfl.losses import detection_loss_terms
from polypflow.viz import box_case, draw_boxes

LOSS = "gfl"  # a detector's recipe names its loss: GFLv2's (quality focal + distribution focal + GIoU)


class DetectionTask:
    """Polyp boxes per image (see the module docstring)."""

    name: ClassVar[str] = "detection"
    metric: ClassVar[str] = "val_ap50"
    metric_label: ClassVar[str] = "val AP50"
    predicts_masks: ClassVar[bool] = False
    val_score: ClassVar[str] = "f1"
    int8_budget: ClassVar[str] = "int8_max_f1_drop"
    case_columns: ClassVar[tuple[str, ...]] = ("dataset", "kind", "rank", "key", "f1", "file")
    onnx_outputs: ClassVar[tuple[str, ...]] = ("boxes", "scores")
    answer_columns: ClassVar[dict[str, str]] = {"boxes": "string", "n_boxes": "long", "max_score": "double"}

    def __init__(self, params: Params, recipe: Recipe | None = None) -> None:
        self.params, self.recipe = params, recipe
        cfg = params.detection
        self.decoding = Decoding(cfg.score_threshold, cfg.nms_iou, cfg.max_detections)
        # training targets: components of at least detection.min_box_area pixels of a frame of
        # profile.macs_image_size (the papers' 352 px), scaled to the training size
        size = recipe.image_size if recipe is not None else params.profile.macs_image_size
        self.min_area = int(round(cfg.min_box_area * (size / params.profile.macs_image_size) ** 2))

    # ------------------------------------------------------------ training (polypflow.train.engine.TrainingTask)

    def check(self) -> None:
        if self.recipe.loss != LOSS:
            raise ValueError(f"recipe.loss: a detection method trains with loss {LOSS!r}, got {self.recipe.loss!r}")
        if self.recipe.distill_weight:
            raise ValueError(f"recipe.distill_weight: {self.recipe.distill_weight}: a detection method has no "
                             "self-distillation (it is a segmenter's, towards its flip-TTA map); set it to 0")

    def dataset(self, data: ImageSet) -> DetectionDataset:
        return DetectionDataset(data, self.recipe.normalize, self.recipe.augment, self.min_area)

    @staticmethod
    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return collate_detection(batch)

    def target_to(self, target: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [b.to(device) for b in target]

    def rescale_target(self, target: list[torch.Tensor], size: int, factor: float) -> list[torch.Tensor]:
        return [b * factor for b in target]

    def loss(self, model: nn.Module, outputs: object, target: list[torch.Tensor], epoch: int) -> torch.Tensor:
        return detection_loss_terms(model, outputs, target, self.params.detection.atss_topk).total

    def detect(self, model: nn.Module, images: np.ndarray, device: torch.device) -> list[Detections]:
        """Detections (model-input pixels) of uint8 images at the training size."""
        return Predictor(BoxBackend(model, self.recipe.normalize, self.decoding, device), images.shape[1],
                         self.params.detection.match_score).predict_resized(images)

    def validate(self, model: nn.Module, val: ImageSet, device: torch.device) -> dict[str, float]:
        if not len(val.keys):
            return {"val_ap50": 0.0}
        score = coco_metrics(self.detect(model, val.images, device), image_boxes(val.masks, self.min_area)).metrics["ap50"]
        return {"val_ap50": score if np.isfinite(score) else 0.0}

    def select(self, metrics: dict[str, float]) -> float:
        return metrics[self.metric]

    def threshold(self, model: nn.Module, train: ImageSet, device: torch.device) -> float:
        """A detector's threshold: the score from which a box counts (``detection.match_score``)."""
        return self.params.detection.match_score

    def meta(self) -> dict[str, Any]:
        d = self.decoding
        return {"decode": {"score_threshold": d.score_threshold, "nms_iou": d.nms_iou, "max_detections": d.max_detections}}

    def calibrate(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> dict[str, Any]:
        """Nothing: a detector's scores ship as trained."""
        return {}

    def video_meta(self, model: nn.Module, val: ImageSet, sequences: list[list[int]], threshold: float,
                   device: torch.device) -> dict[str, Any]:
        """Nothing: a detector's boxes are not smoothed over frames (its stability is not measured either)."""
        return {}

    def val_scores(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> np.ndarray:
        if not len(val.keys):
            return np.zeros(0)
        truth = image_boxes(val.masks, self.min_area)
        return per_image_scores(val.keys, self.detect(model, val.images, device), truth, threshold)["f1"].to_numpy()

    # ------------------------------------------------------------ inference, served answers

    @classmethod
    def predictor(cls, model: nn.Module, meta: dict, threshold: float | None = None, device: torch.device | None = None,
                  batch_size: int = 16, source: str = "") -> Predictor:
        device = device or CPU
        backend = BoxBackend(model.to(device), (meta["mean"], meta["std"]), Decoding(**meta["decode"]), device)
        return trained_predictor(backend, meta, threshold, batch_size, source)

    @classmethod
    def check_threshold(cls, threshold: float) -> None:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1) (a box counts from this score), got {threshold}")

    @classmethod
    def answer(cls, predictor: Predictor, image: np.ndarray, threshold: float,
               output: Detections | None = None) -> tuple[dict[str, Any], np.ndarray, None]:
        detections = predictor.predict([image])[0] if output is None else output
        found = predictor.keep(detections, threshold)
        boxes = [[round(v, 2) for v in box] + [round(score, 4)]
                 for box, score in zip(found.boxes.tolist(), found.scores.tolist(), strict=True)]
        top = float(detections.scores.max()) if len(detections.scores) else 0.0  # the best score, counted or not
        row = {"boxes": json.dumps(boxes), "n_boxes": len(boxes), "max_score": top}
        return row, draw_boxes(image, torch.zeros(0, 4), found, threshold), None

    # ------------------------------------------------------------ evaluation

    def test_source(self, predictor: Predictor, meta: dict, facts: pd.DataFrame) -> Source:
        """A test set's detections in the coordinates of each image's mask."""
        cfg = self.params

        def detections(dataset: str, keys: list[str]) -> tuple[list[str], list[Detections]]:
            data = load_image_set(facts, keys, meta["image_size"], cfg.validate_.mask_threshold, cfg.paths.cache)
            found = predictor.predict_resized(data.images)
            return keys, [predictor.backend.at(d, predictor.image_size, shape)
                          for d, shape in zip(found, mask_shapes(facts, keys), strict=True)]

        return detections

    def scorer(self, threshold: float, facts: pd.DataFrame, cases_dir: Path, smoothing: Smoothing = Smoothing()) -> Scorer:
        """Boxes per image: no smoothing over frames, no stability table."""
        cfg = self.params

        def score(dataset: str, keys: list[str], predictions: Sequence[Detections]) -> TestSetScores:
            truth = self.truth(facts, keys)
            scores = coco_metrics(list(predictions), truth)
            per_image = per_image_scores(keys, list(predictions), truth, threshold)
            per_image["n_truth"] = [len(t) for t in truth]
            tables = {"per_image": per_image, "pr": scores.pr_curve[["recall", "precision"]],
                      "curves": scores.pr_curve.assign(iou=0.5),
                      "sweep": score_threshold_sweep(list(predictions), truth, sweep_thresholds(cfg.evaluate))}
            summary = {"n": len(keys), "n_boxes": int(sum(len(t) for t in truth)),
                       **{f"box_{k}": json_number(v) for k, v in scores.metrics.items()},
                       "f1": json_number(float(per_image["f1"].mean()))}
            cases = self.draw_cases(per_image, predictions, truth, dataset, facts, threshold, cases_dir)
            s = summary
            line = (f"AP {s['box_ap']:.4f} AP50 {s['box_ap50']:.4f} AP75 {s['box_ap75']:.4f} AR100 {s['box_ar100']:.4f}, "
                    f"mean F1 {s['f1']:.4f} at score {threshold:.2f}, {s['n_boxes']} boxes")
            return TestSetScores(tables, summary, cases, line)

        return score

    def draw_cases(self, per_image: pd.DataFrame, predictions: Sequence[Detections], truth: list[torch.Tensor],
                   dataset: str, facts: pd.DataFrame, threshold: float, out: Path) -> list[dict]:
        """The best and worst ``evaluate.cases`` images of a test set by box F1, drawn with their boxes (truth green,
        detections from ``threshold`` red, with scores)."""
        rows = []
        for kind, rank, i in pick_cases(per_image, self.params.evaluate.cases):
            key = per_image.iloc[i]["key"]
            image = read_image(rows_of(facts, [key]).iloc[0]["image_path"])
            name = f"{dataset}_{kind}{rank}.png"
            write_png(out / name, box_case(image, truth[i], predictions[i], threshold))
            rows.append({"dataset": dataset, "kind": kind, "rank": rank, "key": key,
                         "f1": float(per_image.iloc[i]["f1"]), "file": name})
        return rows

    def explain(self, model: nn.Module, meta: dict, facts: pd.DataFrame, keys: Sequence[str], out: Path) -> list[Path]:
        """Grad-CAM explains a segmenter's map: none for boxes (the folder exists, empty)."""
        out.mkdir(parents=True, exist_ok=True)
        return []

    # ------------------------------------------------------------ export, registry

    @classmethod
    def export(cls, model: nn.Module, meta: dict, path: Path, opset: int) -> tuple[float, dict[str, Any]]:
        """The graph decodes every anchor's box and score; parity is checked after the same NMS: the largest
        difference of any detection's box (pixels) or score."""
        graph = DeployGraph(model, anchor_boxes, meta["mean"], meta["std"])
        export_onnx(graph, path, meta["image_size"], opset, cls.onnx_outputs)
        check = detector_parity(graph, path, meta["image_size"], Decoding(**meta["decode"]))
        extra = {"output": "boxes N x A x 4 (x1 y1 x2 y2, pixels) and scores N x A before NMS; NMS after the graph "
                           "(models.gfl_atss.postprocess)", "decode": meta["decode"], "detections": check}
        return max(check["boxes_max_abs"], check["scores_max_abs"]), extra

    def quantize(self, fp32: Path, dst: Path, calibration: Iterable[np.ndarray], weight_bits: int,
                 float_modules: Sequence[str] = ()) -> None:
        """Static int8, QDQ (:func:`~polypflow.infer.onnx.quantize_int8`): the graph up to every anchor's box and
        score; the NMS after it stays the float one."""
        quantize_int8(fp32, dst, calibration, weight_bits, float_modules)

    def graph_scores(self, graphs: Sequence[Path], meta: dict, keys: list[str]) -> tuple[str, np.ndarray]:
        """Box F1 of each image of ``keys`` at the model's threshold (a box counts from that score, matched at IoU
        0.5), each graph's detections after the same NMS (:class:`~polypflow.infer.predictor.OnnxBoxBackend`), in
        the coordinates of each image's mask, as :meth:`scorer` scores them (the mean is evaluate@'s ``f1``)."""
        facts, threshold = read_facts(self.params), float(meta["threshold"])
        truth, scores = self.truth(facts, keys), []
        for path in graphs:
            backend = OnnxBoxBackend(onnx_session(path), Decoding(**meta["decode"]))
            _, found = self.test_source(Predictor(backend, int(meta["image_size"]), threshold), meta, facts)("", keys)
            scores.append(per_image_scores(keys, found, truth, threshold)["f1"].to_numpy())
        return f"box F1 at score {threshold:g} (IoU 0.5) at the masks' resolution", np.array(scores)

    def truth(self, facts: pd.DataFrame, keys: list[str]) -> list[torch.Tensor]:
        """The true boxes of each image of ``keys``: its mask's components of at least ``detection.min_box_area``
        pixels, at the mask's resolution."""
        cfg = self.params
        return [truth_boxes(read_mask(path, cfg.validate_.mask_threshold), cfg.detection.min_box_area)
                for path in rows_of(facts, keys)["mask_path"]]
