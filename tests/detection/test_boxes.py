"""Boxes from masks (hand-made masks), Kvasir-SEG's own boxes, and the matching that compares them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import unless_present

from polypflow.data.boxes import (
    drop_degenerate,
    kvasir_agreement,
    mask_to_boxes,
    match_boxes,
    read_kvasir_boxes,
    summarise_matches,
)
from tests.conftest import REPO

KVASIR = REPO.parent / "shared" / "data" / "Kvasir-SEG"  # as tests/stages/test_split.py finds ../shared/data


@pytest.mark.quick
def test_one_component_gives_its_exclusive_box():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:8] = 1  # rows 2..4, columns 3..7
    result = mask_to_boxes(mask)
    np.testing.assert_array_equal(result.boxes, [[3, 2, 8, 5]])
    assert result.areas.tolist() == [15] and result.dropped_small == result.dropped_degenerate == 0


@pytest.mark.quick
def test_empty_mask_gives_no_box():
    result = mask_to_boxes(np.zeros((8, 8), np.uint8), min_area=5)
    assert result.boxes.shape == (0, 4) and result.dropped_small == 0


@pytest.mark.quick
def test_components_are_8_connected_sorted_by_area_and_specks_dropped():
    mask = np.zeros((20, 20), np.uint8)
    mask[0:2, 0:2] = 1  # 4 px
    mask[2, 2] = 1  # touches the first diagonally: same component (5 px)
    mask[10:16, 10:18] = 1  # 48 px
    mask[19, 0] = 1  # a 1 px speck
    result = mask_to_boxes(mask, min_area=3)
    np.testing.assert_array_equal(result.boxes, [[10, 10, 18, 16], [0, 0, 3, 3]])
    assert result.areas.tolist() == [48, 5] and result.dropped_small == 1


@pytest.mark.quick
def test_single_pixel_and_full_mask():
    mask = np.zeros((6, 6), np.uint8)
    mask[5, 5] = 1
    np.testing.assert_array_equal(mask_to_boxes(mask).boxes, [[5, 5, 6, 6]])
    np.testing.assert_array_equal(mask_to_boxes(np.ones((4, 7), np.uint8)).boxes, [[0, 0, 7, 4]])


@pytest.mark.quick
def test_degenerate_boxes_are_dropped_and_counted():
    boxes = np.array([[0, 0, 4, 4], [2, 2, 2, 5], [1, 3, 6, 3]], np.float32)
    kept, dropped = drop_degenerate(boxes)
    np.testing.assert_array_equal(kept, [[0, 0, 4, 4]])
    assert dropped == 2


@pytest.mark.quick
def test_matching_is_one_to_one_and_respects_min_iou():
    ours = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 52, 52]], np.float32)
    theirs = np.array([[21, 20, 30, 30], [0, 0, 10, 11], [80, 80, 90, 90]], np.float32)
    match = match_boxes(ours, theirs)
    assert sorted(map(tuple, match.pairs.tolist())) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(sorted(match.ious), [0.9, 100 / 110], rtol=1e-6)
    summary = summarise_matches({"a": match}, {"a": ours}, {"a": theirs})
    assert summary["matched"] == 2 and summary["fraction_theirs_matched"] == pytest.approx(2 / 3)
    # ours minus theirs over the two pairs: x1 (0 and -1), y2 (-1 and 0)
    assert summary["mean_offset_x1"] == pytest.approx(-0.5) and summary["mean_offset_y2"] == pytest.approx(-0.5)


@pytest.mark.quick
def test_matching_with_an_empty_side():
    match = match_boxes(np.zeros((0, 4), np.float32), np.array([[0, 0, 1, 1]], np.float32))
    assert match.pairs.shape == (0, 2) and match.theirs == 1


@pytest.mark.quick
def test_read_kvasir_format(tmp_path):
    entry = {"height": 10, "width": 12, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 2, "xmax": 5, "ymax": 9}]}
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"abc": entry, "empty": {"height": 4, "width": 4, "bbox": []}}))
    boxes = read_kvasir_boxes(path)
    np.testing.assert_array_equal(boxes["abc"], [[1, 2, 5, 9]])
    assert boxes["empty"].shape == (0, 4)


@unless_present((KVASIR / "kavsir_bboxes.json").exists(), "shared Kvasir-SEG data not present")
def test_mask_boxes_agree_with_kvasir_boxes():
    """Measured on all 1000 images (masks > 127, components >= 10 px): 1063 boxes of ours, 1071 of theirs,
    1062 matched at IoU >= 0.5 (99.2 % of theirs), mean IoU 0.987, median 0.991; their boxes extend one
    pixel further left and up (median offset ours - theirs: x1 +1, y1 +1, x2 0, y2 0)."""
    _, summary = kvasir_agreement(KVASIR, min_area=10)
    assert summary["images"] == 1000
    assert summary["fraction_theirs_matched"] >= 0.98 and summary["fraction_ours_matched"] >= 0.99
    assert summary["mean_iou"] >= 0.98 and summary["median_iou"] >= 0.985
    assert (summary["median_offset_x1"], summary["median_offset_y1"]) == (1.0, 1.0)
    assert (summary["median_offset_x2"], summary["median_offset_y2"]) == (0.0, 0.0)
