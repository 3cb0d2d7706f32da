"""Data quality's pieces: per-image facts, the file a failed check blames, the failure summary (the suites end to
end: tests/stages/test_validate.py)."""

from __future__ import annotations

import pytest

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import REPO, make_pair
from PIL import Image, ImageDraw

from polypflow.data.quality import at_fault, image_facts, likely_inverted, mask_facts, readable_failures
from polypflow.settings.config import load_params

pytestmark = pytest.mark.quick

BAND = (32, 223)
VALIDATE = load_params(REPO / "params.yaml").validate_


def test_mask_facts_measure_grey_polyp_and_edge_shares():
    grey = np.zeros((10, 10), np.uint8)
    grey[:, :5] = 255  # polyp on the left half, touching the edge
    grey[0, 5:] = 100  # a grey row end
    facts = mask_facts(grey, threshold=127, band=BAND)
    assert facts == {"ambiguous_fraction": 0.05, "mask_fraction": 0.5, "border_fraction": 18 / 36,
                     "least_side_fraction": 0.0, "mask_scaled_0_1": False}  # the right side has no polyp


def test_a_mask_scaled_0_1_is_named_as_such_and_not_also_empty():
    grey = np.zeros((8, 8), np.uint8)
    grey[2:5, 2:5] = 1
    facts = mask_facts(grey, threshold=127, band=BAND)
    assert facts["mask_scaled_0_1"] is True
    assert np.isnan(facts["mask_fraction"]) and np.isnan(facts["border_fraction"])
    assert np.isnan(facts["least_side_fraction"])


def ellipse(box: tuple[int, int, int, int], size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A 0/255 mask with one polyp, the ellipse in ``box`` (x0, y0, x1, y1; it may reach past the frame)."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return np.asarray(mask)


def flagged(grey: np.ndarray) -> bool:
    facts = pd.DataFrame([mask_facts(grey, threshold=127, band=BAND)])
    return bool(likely_inverted(facts, VALIDATE).iloc[0])


POLYP_AT_THE_BOTTOM = (14, 34, 52, 72)  # cut by the bottom edge: 24 % of the frame along 13 % of its edge


def test_an_inverted_large_polyp_at_the_edge_is_flagged():
    """Issue 22: inverted, a large polyp cut by the frame's edge leaves 76 % "polyp" along 87 % of the edge, which
    passed the old rule (over 90 % of the edge); its "polyp", the colon wall, lines all four sides."""
    inverted = 255 - ellipse(POLYP_AT_THE_BOTTOM)
    facts = mask_facts(inverted, threshold=127, band=BAND)
    assert facts["mask_fraction"] == pytest.approx(0.76, abs=0.01)
    assert facts["border_fraction"] == pytest.approx(0.87, abs=0.01)
    assert facts["least_side_fraction"] == pytest.approx(0.48, abs=0.01)
    assert flagged(inverted)
    assert flagged(255 - ellipse((20, 20, 44, 44)))  # a polyp in the middle, inverted


@pytest.mark.parametrize("box", [POLYP_AT_THE_BOTTOM, (-20, -10, 56, 74), (-10, -10, 74, 50), (8, 8, 56, 56)],
                         ids=["at_the_bottom", "over_three_sides", "over_the_top_half", "in_the_middle"])
def test_a_large_polyp_touching_the_edge_is_not_flagged(box):
    """Real polyps, however large, leave a side of the frame clear (the largest of 1992 real masks: 81 %)."""
    assert not flagged(ellipse(box))


def test_a_mask_beyond_max_mask_fraction_is_left_to_that_check():
    assert not flagged(np.full((64, 64), 255, np.uint8))


def test_image_facts_record_an_unreadable_file_instead_of_raising(tmp_path: Path):
    image, mask = make_pair(0)
    image.save(tmp_path / "1.png")
    (tmp_path / "1_mask.png").write_bytes(b"not a png")
    facts = image_facts(str(tmp_path / "1.png"), str(tmp_path / "1_mask.png"), 127, BAND)
    assert facts["image_readable"] and facts["channels"] == 3 and facts["image_mode"] == "RGB"
    assert not facts["mask_readable"] and "cannot identify image file" in facts["mask_error"]
    assert facts["decoded_size_match"] is False


def pair_row(image_path: str = "i/1.png", mask_path: str = "m/1.png", image_readable: bool = True) -> pd.Series:
    return pd.Series({"image_path": image_path, "mask_path": mask_path, "file": image_path or mask_path,
                      "image_readable": image_readable})


def test_at_fault_blames_the_mask_for_its_checks_and_the_image_otherwise():
    assert at_fault(pair_row(), "mask_fraction") == "m/1.png"
    assert at_fault(pair_row(), "channels") == "i/1.png"
    assert at_fault(pair_row(), "decoded_size_match") == "m/1.png"
    assert at_fault(pair_row(image_readable=False), "decoded_size_match") == "i/1.png"  # no size to compare with
    assert at_fault(pair_row(mask_path=""), "mask_readable") == "i/1.png"  # no mask: the image it lacks


def test_readable_failures_list_failed_checks_up_to_the_limit():
    checks = [{"expectation": "expect_column_values_to_be_in_set", "kwargs": {"column": "paired"}, "success": False,
               "unexpected_count": 3, "messages": ["a: no mask", "b: no mask", "c: no mask"]},
              {"expectation": "expect_column_values_to_be_unique", "kwargs": {"column": "file"}, "success": True,
               "unexpected_count": 0, "messages": []}]
    assert readable_failures(checks, limit=2) == ("expect_column_values_to_be_in_set(paired): 3 failing:\n"
                                                  "  a: no mask\n  b: no mask\n  ... and 1 more in the report")
