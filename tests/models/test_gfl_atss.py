"""The GFLv2 head's pieces: pyramid levels and strides, DGQP, the per-anchor layout, post-processing."""

from __future__ import annotations

import pytest
import torch

from models import build_model, method_entry
from models.gfl_atss import DGQP, postprocess

pytestmark = pytest.mark.quick

TINY = {**method_entry("gfl_atss").test_kwargs, "pretrained": "none"}


def test_p3_to_p7_adds_two_coarser_levels():
    model = build_model("gfl_atss", **TINY, levels=5).eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 256, 256))  # P7 2 x 2 (the tiny head's GroupNorm needs > 1 value a group)
    assert model.strides == [8, 16, 32, 64, 128]
    assert [tuple(s.shape[-2:]) for s in outputs.scores] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="levels"):
        build_model("gfl_atss", **TINY, levels=4)


def test_flatten_lays_out_anchors_level_by_level_row_major():
    model = build_model("gfl_atss", **TINY).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    scores, logits = model.flatten(outputs)
    grid = model.anchors(outputs)
    assert grid.counts == (8 * 12, 4 * 6, 2 * 3) and scores.shape == (2, sum(grid.counts))
    assert logits.shape == (2, sum(grid.counts), 4, model.reg_max + 1)
    # anchor 13 of P3 is row 1, column 1 of the 8 x 12 map
    assert scores[1, 13] == outputs.scores[0][1, 0, 1, 1]
    assert logits[1, 13, 2, 3] == outputs.box_logits[0][1, 2 * (model.reg_max + 1) + 3, 1, 1]
    torch.testing.assert_close(grid.centres[13], torch.tensor([12.0, 12.0]))


def test_dgqp_reads_the_top_k_and_mean_of_each_edge():
    """A peaked distribution (confident edge) and a flat one give different qualities; the MLP's input has
    4 x (k + 1) channels; the output is a probability map."""
    dgqp = DGQP(reg_max=4, topk=2, channels=8)
    assert dgqp.mlp[0].in_channels == 4 * 3
    flat, peaked = torch.zeros(1, 20, 3, 3), torch.zeros(1, 20, 3, 3)
    peaked[:, ::5] = 10.0  # bin 0 of every edge
    q_flat, q_peaked = dgqp(flat), dgqp(peaked)
    assert q_flat.shape == (1, 1, 3, 3) and ((q_flat > 0) & (q_flat < 1)).all()
    assert not torch.allclose(q_flat, q_peaked)


def test_postprocess_thresholds_suppresses_and_caps():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.01])
    found = postprocess(boxes, scores, score_threshold=0.05, nms_iou=0.6, max_detections=5)
    torch.testing.assert_close(found.boxes, boxes[[0, 2]])  # [1, 0, 11, 10] overlaps the first at IoU 0.82
    assert len(postprocess(boxes, scores, 0.05, 0.6, max_detections=1).boxes) == 1
    assert len(postprocess(boxes, scores, 0.95, 0.6, 5).boxes) == 0
