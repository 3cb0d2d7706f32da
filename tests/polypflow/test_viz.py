"""The drawings: boxes in the truth and prediction colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.gfl_atss import Detections
from polypflow.viz import PRED_COLOUR, TRUTH_COLOUR, draw_boxes

pytestmark = pytest.mark.quick


def test_draw_boxes_uses_the_truth_and_prediction_colours():
    image = np.zeros((120, 120, 3), np.uint8)
    truth = torch.tensor([[10.0, 10, 110, 110]])
    found = Detections(torch.tensor([[30.0, 30, 60, 60], [0, 0, 5, 5]]), torch.tensor([0.7, 0.1]))
    out = draw_boxes(image, truth, found, score_threshold=0.5)
    assert out.shape == image.shape and not out[:5, :5].any()  # the 0.1 detection is not drawn
    assert (out[10, 50] == TRUTH_COLOUR).all() and (out[30, 45] == PRED_COLOUR).all()
