"""Perceptual hashes: a re-encoded, rescaled copy is a near duplicate; different frames are not."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from conftest import make_pair
from polypflow.leakage import check, dhash, hamming, phash


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
