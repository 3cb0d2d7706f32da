"""Smoke test of the detection task: the tiny detector on synthetic 64x64 polyps, a few steps; its settings; its
answer to one image; its exported graph's detections through ONNX Runtime and the same NMS."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from models import build_model, method_entry
from models.gfl_atss import Detections
from polypflow.data.images import NORMALIZATION, ImageSet
from polypflow.infer.onnx import onnx_session
from polypflow.infer.predictor import BoxBackend, Decoding, OnnxBoxBackend, Predictor
from polypflow.settings.config import Params, load_params
from polypflow.tasks.detection import DetectionTask
from polypflow.train.gfl.losses import detection_loss_terms
from tests.conftest import REPO, make_pair

STEPS = 20
PARAMS = load_params(REPO / "params.yaml")


def synthetic(n: int) -> ImageSet:
    pairs = [make_pair(300 + i) for i in range(n)]
    images = np.stack([np.asarray(image) for image, _ in pairs])
    masks = np.stack([(np.asarray(mask) > 127).astype(np.uint8) for _, mask in pairs])
    return ImageSet([f"synthetic/{i}" for i in range(n)], images, masks)


def detection_method(params: Params) -> str:
    return next(m for m in params.methods if params.method_arch(m)[0] == "gfl_atss")


def test_tiny_detector_learns_the_synthetic_polyps():
    """AP50 on the 8 training images after 20 Adam steps (batch 8, flips and rot90) above 0.5 and above its
    value before training (measured: 0.0 before, 1.0 after); every step has positives and a finite loss."""
    torch.manual_seed(0)
    model = build_model("gfl_atss", pretrained="none", **method_entry("gfl_atss").test_kwargs)
    recipe = PARAMS.recipe(detection_method(PARAMS), {"image_size": 64, "normalize": "imagenet", "augment": "basic"})
    data, task, cpu = synthetic(8), DetectionTask(PARAMS, recipe), torch.device("cpu")
    task.check()  # the method's recipe trains with the detector's loss
    before = task.validate(model, data, cpu)["val_ap50"]
    dataset = task.dataset(data)
    dataset.transform.set_random_seed(0)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=task.collate,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        for images, boxes in loader:
            optimizer.zero_grad()
            terms = detection_loss_terms(model, model(images), boxes, PARAMS.detection.atss_topk)
            assert torch.isfinite(terms.total) and terms.positives > 0
            terms.total.backward()
            optimizer.step()
    after = task.validate(model, data, cpu)["val_ap50"]
    assert after > max(before, 0.5), (before, after)
    found = task.detect(model, data.images[:2], cpu)
    decode = PARAMS.detection
    assert len(found) == 2
    assert all(len(d.boxes) <= decode.max_detections and (d.scores > decode.score_threshold).all() for d in found)


@pytest.mark.parametrize(("image_size", "expected"), [(352, 16), (704, 64), (176, 4), (64, 1)])
@pytest.mark.quick
def test_training_boxes_keep_the_minimum_area_of_a_papers_frame_at_the_training_size(image_size, expected):
    """detection.min_box_area (here 16 px) holds at profile.macs_image_size (here 352 px) and scales with the area."""
    params = PARAMS.model_copy(update={"detection": PARAMS.detection.model_copy(update={"min_box_area": 16}),
                                       "profile": PARAMS.profile.model_copy(update={"macs_image_size": 352})})
    recipe = params.recipe(detection_method(params), {"image_size": image_size})
    assert DetectionTask(params, recipe).min_area == expected
    assert DetectionTask(params).min_area == 16  # no recipe: at profile.macs_image_size


@pytest.mark.quick
def test_a_detection_recipe_must_train_with_the_detectors_loss():
    recipe = PARAMS.recipe(detection_method(PARAMS), {"loss": "bce_dice"})
    with pytest.raises(ValueError, match="recipe.loss: a detection method trains with loss 'gfl'"):
        DetectionTask(PARAMS, recipe).check()


@pytest.mark.quick
def test_a_detection_recipe_has_no_self_distillation():
    recipe = PARAMS.recipe(detection_method(PARAMS), {"ema_decay": 0.99, "distill_weight": 0.5})
    with pytest.raises(ValueError, match="recipe.distill_weight: 0.5: a detection method has no self-distillation"):
        DetectionTask(PARAMS, recipe).check()


class FixedBoxes(BoxBackend):
    """A detector that finds the same boxes (model-input pixels) in every image."""

    def __init__(self, found: Detections) -> None:
        self.found = found

    def __call__(self, images: np.ndarray) -> list[Detections]:
        return [self.found for _ in images]


def test_an_answer_counts_the_boxes_from_the_threshold_and_reports_the_best_score_of_all():
    found = Detections(torch.tensor([[8.0, 16, 32, 48], [40, 40, 60, 60]]), torch.tensor([0.9, 0.2]))
    predictor = Predictor(FixedBoxes(found), 64, 0.5)
    image = np.zeros((128, 96, 3), np.uint8)  # H 128, W 96: x by 1.5, y by 2 from the model's 64 px
    row, overlay, mask = DetectionTask.answer(predictor, image, 0.5)
    assert mask is None and overlay.shape == image.shape and overlay.any()
    assert row["n_boxes"] == 1 and row["max_score"] == pytest.approx(0.9)
    assert json.loads(row["boxes"]) == [[12.0, 32.0, 48.0, 96.0, 0.9]]  # in the image's pixels, with its score
    none, overlay, _ = DetectionTask.answer(predictor, image, 0.95)
    assert none["n_boxes"] == 0 and json.loads(none["boxes"]) == [] and not overlay.any()
    assert none["max_score"] == pytest.approx(0.9)  # the best score of all detections, counted or not
    assert set(row) == set(DetectionTask.answer_columns)


@pytest.mark.parametrize(("threshold", "valid"), [(0.0, True), (0.3, True), (0.999, True), (1.0, False), (-0.1, False)])
def test_a_detectors_threshold_is_a_score_in_0_to_1(threshold, valid):
    if valid:
        DetectionTask.check_threshold(threshold)
    else:
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
            DetectionTask.check_threshold(threshold)


def test_the_exported_graph_on_onnx_runtime_finds_the_boxes_the_model_finds(tmp_path):
    """The detector's graph (every anchor's box and score) through :class:`OnnxBoxBackend` and the same NMS gives
    the detections PyTorch gives, on synthetic frames: as many, in the same order, boxes within 1e-2 px and scores
    within 1e-4 (what export@'s int8 check scores the fp32 and int8 graphs by)."""
    torch.manual_seed(0)
    model = build_model("gfl_atss", pretrained="none", **method_entry("gfl_atss").test_kwargs).eval()
    mean, std = NORMALIZATION["imagenet"]
    decoding = Decoding(score_threshold=0.0, nms_iou=0.6, max_detections=20)  # an untrained head's scores are low
    meta = {"image_size": 64, "mean": mean, "std": std, "decode": dataclasses.asdict(decoding)}
    DetectionTask.export(model, meta, tmp_path / "model.onnx", PARAMS.export.opset)
    images = synthetic(3).images
    expected = Predictor(BoxBackend(model, (mean, std), decoding), 64, 0.3).predict_resized(images)
    got = Predictor(OnnxBoxBackend(onnx_session(tmp_path / "model.onnx"), decoding), 64, 0.3).predict_resized(images)
    assert [len(d.boxes) for d in got] == [len(d.boxes) for d in expected] and all(len(d.boxes) for d in got)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(g.boxes, e.boxes, atol=1e-2) and torch.allclose(g.scores, e.scores, atol=1e-4)
