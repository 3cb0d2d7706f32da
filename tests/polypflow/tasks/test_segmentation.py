"""The segmentation task's threshold search (CRIS's): the grid's threshold of best mean Dice; the map temperature
it ships with, chosen on validation by the toolbox meanDic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from polypflow.data.images import NORMALIZATION, ImageSet
from polypflow.evaluate.seg_metrics import toolbox_dice
from polypflow.infer.device import CPU
from polypflow.settings.config import load_params
from polypflow.tasks.segmentation import SegmentationTask, predict_probs, search_threshold
from tests.conftest import REPO

PARAMS = load_params(REPO / "params.yaml")


@pytest.mark.quick
def test_search_threshold_picks_the_separating_threshold():
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 1
    probs = np.where(masks > 0, 0.62, 0.58).astype(np.float32)
    assert search_threshold(probs, masks) == pytest.approx(0.6)  # only 0.60 separates polyp from background
    probs = np.where(masks > 0, 0.27, 0.12).astype(np.float32)
    assert search_threshold(probs, masks) in (pytest.approx(0.15), pytest.approx(0.2), pytest.approx(0.25))
    low = np.where(masks > 0, 0.9, 0.3).astype(np.float32)
    best = search_threshold(low, masks)
    assert 0.3 < best <= 0.9


class Ramp(nn.Module):
    """A segmenter whose logit is its input's red channel (normalised): a soft map, right at 0.5 on a ramp image."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (2 * x[:, :1],)


def ramps(n: int = 3, size: int = 32) -> ImageSet:
    """Images whose red channel rises left to right (each a different slope); polyp where the normalised red is > 0."""
    zero = NORMALIZATION["imagenet"][0][0] * 255
    images, masks = [], []
    for i in range(n):
        red = np.clip(zero + np.linspace(-60 - 20 * i, 60 + 10 * i, size), 0, 255)
        image = np.zeros((size, size, 3), np.uint8)
        image[..., 0] = np.round(red)[None, :]
        images.append(image)
        masks.append((image[..., 0] > zero).astype(np.uint8))
    return ImageSet([f"ramp/{i}" for i in range(n)], np.stack(images), np.stack(masks))


def task_with(temperatures: list[float]) -> SegmentationTask:
    params = PARAMS.model_copy(update={"train": PARAMS.train.model_copy(update={"temperatures": temperatures})})
    return SegmentationTask(params, params.recipe("fcn_if", {"normalize": "imagenet", "channels_last": False}))


@pytest.mark.quick
def test_calibrate_ships_the_temperature_of_best_validation_meandic_and_moves_the_threshold_with_it():
    val, model = ramps(), Ramp().eval()
    raw = predict_probs(model, val.images, "imagenet", CPU)
    chosen = task_with([1.0, 2.0, 4.0, 8.0]).calibrate(model, val, 0.3, CPU)
    by_hand = {f"{t:g}": np.mean([toolbox_dice(1 / (1 + (1 / p - 1) ** t), m) for p, m in zip(raw, val.masks)])
               for t in (1, 2, 4, 8)}
    assert chosen["val_meandic"] == pytest.approx(by_hand, abs=1e-3)
    best = max(by_hand, key=by_hand.get)
    assert best != "1" and chosen["temperature"] == float(best) and model.temperature == float(best)
    t = chosen["temperature"]
    assert chosen["threshold"] == pytest.approx(1 / (1 + (1 / 0.3 - 1) ** t))
    shipped = predict_probs(model, val.images, "imagenet", CPU)  # the model now ships the sharper map ...
    np.testing.assert_allclose(shipped, 1 / (1 + (1 / raw - 1) ** t), atol=1e-5)
    np.testing.assert_array_equal(shipped >= chosen["threshold"], raw >= 0.3)  # ... with the same mask


@pytest.mark.quick
def test_calibrate_is_a_no_op_with_the_one_temperature_1_or_no_validation_images():
    val, model = ramps(), Ramp().eval()
    assert task_with([1.0]).calibrate(model, val, 0.4, CPU) == {"temperature": 1.0, "threshold": 0.4, "val_meandic": {}}
    empty = ImageSet([], val.images[:0], val.masks[:0])
    assert task_with([1.0, 8.0]).calibrate(model, empty, 0.4, CPU)["temperature"] == 1.0
    assert getattr(model, "temperature", 1.0) == 1.0
