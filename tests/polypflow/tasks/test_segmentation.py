"""The segmentation task's threshold search (CRIS's): the grid's threshold of best mean Dice."""

from __future__ import annotations

import numpy as np
import pytest

from polypflow.tasks.segmentation import search_threshold


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
