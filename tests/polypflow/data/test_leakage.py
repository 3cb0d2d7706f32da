"""Leakage: sequence mates and exact duplicates share a group, a leaky split is refused, and by perceptual hashes a
re-encoded, rescaled copy is a near duplicate while different frames are not."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from conftest import make_pair
from polypflow.data.leakage import check, check_no_leakage, dhash, hamming, leakage_groups, phash

pytestmark = pytest.mark.quick


def leaky_frame(**changes: str) -> pd.DataFrame:
    df = pd.DataFrame({"leak_group": ["a", "a", "b", "c"], "image_sha256": ["h1", "h2", "h3", "h4"],
                       "set": ["train", "train", "val", "test"]})
    for column, value in changes.items():
        df.loc[3, column] = value
    return df


def test_check_no_leakage_raises_on_a_leaky_frame():
    check_no_leakage(leaky_frame())  # clean: no error
    with pytest.raises(ValueError, match=r"leak_group.*\['a'\]"):
        check_no_leakage(leaky_frame(leak_group="a"))  # a group member in test, the rest in train
    with pytest.raises(ValueError, match=r"image_sha256.*\['h3'\]"):
        check_no_leakage(leaky_frame(image_sha256="h3"))  # the same image in val and in test


def test_leakage_groups_join_sequence_mates_and_copies_whatever_the_row_order():
    facts = pd.DataFrame({"group": ["a/seq1", "a/seq1", "a/3", "b/seq2", "b/7"],
                          "image_sha256": ["h1", "h2", "h3", "h3", "h4"]})  # a/3 and b/seq2 hold one image
    assert leakage_groups(facts).tolist() == ["a/seq1", "a/seq1", "a/3", "a/3", "b/7"]
    shuffled = facts.sample(frac=1, random_state=0)
    assert leakage_groups(shuffled).to_dict() == leakage_groups(facts).to_dict()


def test_copies_chain_groups_together():
    """A copy of a copy: three groups joined through two shared images, named by the smallest label."""
    facts = pd.DataFrame({"group": ["c/1", "b/seq1", "b/seq1", "a/9"], "image_sha256": ["x", "x", "y", "y"]})
    assert set(leakage_groups(facts)) == {"a/9"}


def frame(seed: int) -> Image.Image:
    """A frame with smooth structure (uneven lighting, folds) like endoscopy, unlike the fixture's noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:128, :128] / 128
    light = 0.6 + 0.4 * np.cos(2 * np.pi * (rng.uniform(0.5, 1.5) * xx + rng.uniform(0.5, 1.5) * yy + rng.uniform()))
    image = np.asarray(make_pair(seed, size=128)[0], np.float64) * light[..., None]
    return Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))


def reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.resize((image.width * 5 // 4, image.height * 5 // 4)).save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_hash_distances():
    a, b = frame(1), frame(2)
    copy = reencoded(a)
    for fn in (dhash, phash):
        same = hamming(np.array([fn(a)]), np.array([fn(copy)]))[0, 0]
        other = hamming(np.array([fn(a)]), np.array([fn(b)]))[0, 0]
        assert same <= 6 < 12 <= other, (fn.__name__, same, other)  # copies close, other frames far
    assert hamming(np.array([np.uint64(0)]), np.array([np.uint64(2**64 - 1)]))[0, 0] == 64


def test_check_finds_the_planted_duplicate(tmp_path):
    rows = []
    for i in range(6):
        image = frame(10 + i)
        path = tmp_path / f"{i}.png"
        image.save(path)
        rows.append({"dataset": "a", "id": str(i), "image_path": str(path)})
    reencoded(Image.open(tmp_path / "0.png")).save(tmp_path / "copy.jpg")
    rows.append({"dataset": "b", "id": "copy", "image_path": str(tmp_path / "copy.jpg")})
    splits = {"train": ["a/0", "a/1", "a/2"], "val": ["a/3"], "test": {"a": ["a/4", "a/5"], "b": ["b/copy"]}}
    pairs, summary = check(splits, pd.DataFrame(rows), max_distance=4)
    assert list(zip(pairs["test_key"], pairs["train_key"], strict=True)) == [("b/copy", "a/0")]
    assert summary["hashed"] == 7 and summary["test_images_with_near_duplicate"] == {"a": 0, "b": 1}
