"""One parametrised test over every registered method: shapes, a training step, ONNX parity (segmenters and
detectors each through their own output contract)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from models import build_model, list_methods, method_entry, method_task
from polypflow.data.images import NORMALIZATION
from polypflow.infer.onnx import onnx_session
from polypflow.settings.config import load_params
from polypflow.tasks import task_of
from polypflow.train.gfl.losses import detection_loss_terms
from polypflow.train.losses import build_loss
from tests.conftest import REPO

SIZE = 64
PARAMS = load_params(REPO / "params.yaml")
MEAN, STD = NORMALIZATION["imagenet"]
META = {"image_size": SIZE, "mean": list(MEAN), "std": list(STD)}  # what a trained model's metadata gives export


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"pretrained": "none", **method_entry(name).test_kwargs}
    return build_model(name, **kwargs)


@pytest.mark.quick
def test_unknown_method_lists_known_ones():
    with pytest.raises(KeyError, match="registered: .*unet"):
        build_model("no_such_method")


@pytest.mark.quick
def test_every_method_has_a_task_and_the_lists_partition_the_registry():
    segmenters, detectors = list_methods("segmentation"), list_methods("detection")
    assert sorted(segmenters + detectors) == list_methods()
    assert "unet" in segmenters and "gfl_atss" in detectors
    assert {method_task(n) for n in detectors} == {"detection"}


@pytest.mark.parametrize("name", list_methods("segmentation"))
@pytest.mark.quick
def test_forward_contract(name):
    model = tiny(name).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, SIZE, SIZE))
    assert isinstance(outputs, tuple) and len(outputs) >= 1
    for out in outputs:
        assert out.shape == (2, 1, SIZE, SIZE)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_methods("segmentation"))
def test_training_step_lowers_loss(name):
    model = tiny(name).train()
    image = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[:, :, 16:48, 20:44] = 1
    image[:, 0][mask[:, 0] > 0] += 0.5  # a learnable cue: the polyp is redder
    loss_fn = build_loss("bce_dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model(image), mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", list_methods("segmentation"))
def test_onnx_export_parity(name, tmp_path):
    """The task's export: normalisation, model and probability in one graph, as PyTorch computes it."""
    model, task = tiny(name).eval(), task_of(name)
    path = tmp_path / f"{name}.onnx"
    max_diff, _ = task.export(model, META, path, PARAMS.export.opset)
    assert max_diff < 1e-3
    assert tuple(o.name for o in onnx_session(path).get_outputs()) == task.onnx_outputs == ("probability",)


@pytest.mark.parametrize("name", list_methods("detection"))
@pytest.mark.quick
def test_detector_output_contract(name):
    """Raw outputs: per level, N x 1 x H x W joint scores in [0, 1] and N x 4(reg_max+1) x H x W box logits,
    finer levels first; ``decode`` gives per image boxes inside the image, best score first."""
    model = tiny(name).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, SIZE, SIZE))
        detections = model.decode(outputs, (SIZE, SIZE), score_threshold=0.0, max_detections=7)
    assert len(outputs.scores) == len(outputs.box_logits) == len(model.strides)
    for scores, logits, stride in zip(outputs.scores, outputs.box_logits, model.strides, strict=True):
        assert scores.shape == (2, 1, SIZE // stride, SIZE // stride)
        assert logits.shape == (2, 4 * (model.reg_max + 1), SIZE // stride, SIZE // stride)
        assert ((scores >= 0) & (scores <= 1)).all() and torch.isfinite(logits).all()
    assert len(detections) == 2
    for found in detections:
        assert found.boxes.shape == (7, 4) and found.scores.shape == (7,)
        assert (found.boxes >= 0).all() and (found.boxes <= SIZE).all()
        assert (found.scores.diff() <= 0).all()


@pytest.mark.parametrize("name", list_methods("detection"))
def test_detector_training_steps_find_the_box(name):
    """GFL's total loss rises before it falls (its box terms are weighted by the predicted score, which starts
    near 0.01 x 0.5), so the check is on the detections: after 8 steps each image's best-scoring box overlaps
    the polyp (measured: IoU 0.20-0.25 before, 0.84-0.89 after, with scores 0.006 -> 0.40)."""
    model = tiny(name).train()
    image = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    image[:, 0, 16:48, 20:44] += 0.5  # a learnable cue: the polyp is redder
    boxes = [torch.tensor([[20.0, 16, 44, 48]])] * 4
    before = top_box_iou(model, image, boxes[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        optimizer.zero_grad()
        loss = detection_loss_terms(model, model(image), boxes, PARAMS.detection.atss_topk).total
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    after = top_box_iou(model, image, boxes[0])
    assert (after > before).all() and (after > 0.6).all(), (before, after)


def top_box_iou(model: torch.nn.Module, image: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        found = model.decode(model(image), (SIZE, SIZE), score_threshold=0.0, max_detections=1)
    model.train()
    return torch.cat([box_iou(f.boxes, truth)[:, 0] for f in found])


@pytest.mark.parametrize("name", list_methods("detection"))
def test_detector_onnx_export_parity(name, tmp_path):
    """The task's export: decoded boxes and scores before NMS, then the same NMS on both sides (score threshold 0
    so that an untrained model has detections to compare)."""
    model, task = tiny(name).eval(), task_of(name)
    d = PARAMS.detection
    meta = {**META, "decode": {"score_threshold": 0.0, "nms_iou": d.nms_iou, "max_detections": d.max_detections}}
    path = tmp_path / f"{name}.onnx"
    max_diff, extra = task.export(model, meta, path, PARAMS.export.opset)
    result = extra["detections"]
    assert result["raw_boxes_max_abs"] < 1e-3 and result["raw_scores_max_abs"] < 1e-5
    assert result["detections"] > 0 and result["same_count"]
    assert result["boxes_max_abs"] < 1e-3 and result["scores_max_abs"] < 1e-5
    assert max_diff == max(result["boxes_max_abs"], result["scores_max_abs"]) and extra["decode"] == meta["decode"]
    assert tuple(o.name for o in onnx_session(path).get_outputs()) == task.onnx_outputs == ("boxes", "scores")
