"""Evaluate's best/worst cases rank and draw each model at its own threshold, as it ships."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_pair, synthetic_params
from polypflow.settings.config import Params
from polypflow.tasks.segmentation import SegmentationTask

pytestmark = pytest.mark.quick


def tinted_red(path) -> int:
    """Pixels of the overlay (right half) pulled towards the prediction's red: green well below the image's."""
    panel = np.asarray(Image.open(path).convert("RGB")).astype(int)
    image, overlay = panel[:, :panel.shape[1] // 2], panel[:, panel.shape[1] // 2:]
    return int((overlay[..., 1] < image[..., 1] - 15).sum())


def test_cases_rank_and_draw_at_the_method_threshold(tmp_path, synthetic_root):
    params = Params.model_validate(synthetic_params(synthetic_root))
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"cases": 1})})
    facts, probs = [], []
    for i, key in enumerate(["alpha/1", "alpha/2"]):
        image, mask = make_pair(i)
        image.save(tmp_path / f"{i}.png")
        mask.save(tmp_path / f"{i}_mask.png")
        facts.append({"dataset": "alpha", "id": key.split("/")[1], "image_path": str(tmp_path / f"{i}.png"),
                      "mask_path": str(tmp_path / f"{i}_mask.png")})
        probs.append(np.where(np.asarray(mask) > 0, 0.3, 0.0).astype(np.float32))  # under-confident: 0.3 on the polyp
    # alpha/1: nothing at 0.5, perfect at the stored 0.25; alpha/2 the other way round
    per_image = pd.DataFrame({"key": ["alpha/1", "alpha/2"], "dice": [0.0, 0.8], "dice_at_method_threshold": [1.0, 0.5]})
    task = SegmentationTask(params)
    rows = task.draw_cases(per_image, np.stack(probs), "alpha", pd.DataFrame(facts), 0.25, tmp_path / "cases")

    assert [(r["kind"], r["key"], r["dice"]) for r in rows] == [("best", "alpha/1", 1.0), ("worst", "alpha/2", 0.5)]
    assert tinted_red(tmp_path / "cases" / "alpha_best1.png") > 100  # the 0.3 map drawn at 0.25, not at 0.5
