"""Leakage between the sides of a split: grouping that keeps related images together, and checks.

Before splitting, :func:`leakage_groups` gives frames of one video sequence (the manifest's ``group``) and
exact duplicates (same sha256, in any dataset) one label, so that the split keeps each group on one side;
:func:`check_no_leakage` verifies that it did.

After splitting, :func:`check` looks for what byte equality misses: the same frame re-encoded, rescaled, or a
neighbouring frame, across the training and test sides of ``splits.json``. Two 64-bit perceptual hashes of the
grey image:

* **dHash**: 9×8 thumbnail, bit = left pixel brighter than its right neighbour (gradient structure);
* **pHash**: 32×32 thumbnail, 2-D DCT-II, the 8×8 lowest frequencies, bit = coefficient above their
  median (the DC term included, as ``imagehash.phash`` does).

A (train or val image, test image) pair is a near duplicate when *both* Hamming distances are at most
``report.leakage_max_distance``: requiring both keeps the false alarms of either hash alone down.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

from polypflow.data.images import by_image_key


# --- before and while splitting: sequence mates and exact duplicates ----------------------------------------


def leakage_groups(df: pd.DataFrame) -> pd.Series:
    """One label per image such that sequence mates (same ``group``) and exact duplicates (same
    ``image_sha256``) share it (union-find); a merged group is named by its smallest label, so row order is
    irrelevant."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, members in df.groupby("image_sha256")["group"]:
        roots = sorted({find(g) for g in members})
        for other in roots[1:]:
            parent[other] = roots[0]
    return df["group"].map(find)


def check_no_leakage(df: pd.DataFrame) -> None:
    """Raise if one leakage group or one image hash sits in more than one of train/val/test (column ``set``)."""
    for column in ("leak_group", "image_sha256"):
        spread = df.groupby(column)["set"].nunique()
        if (spread > 1).any():
            raise ValueError(f"split leaks {column} across sets: {list(spread[spread > 1].index[:5])}")


# --- after splitting: near duplicates by perceptual hashes ---------------------------------------------------

COLUMNS = ["test_key", "train_key", "test_side", "train_side", "dhash_distance", "phash_distance"]


def grey_thumbnail(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` as a float grey array of ``size`` (width, height), area-averaged."""
    image.draft("L", (size[0] * 4, size[1] * 4))  # JPEG: decode at reduced scale (fast); no-op otherwise
    return np.asarray(image.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def pack(bits: np.ndarray) -> np.uint64:
    """64 booleans -> one unsigned 64-bit integer (first bit most significant)."""
    return np.uint64(int("".join("1" if b else "0" for b in bits.ravel()), 2))


def dhash(image: Image.Image) -> np.uint64:
    """Difference hash: bit = a pixel of the 9×8 grey thumbnail brighter than its right neighbour."""
    pixels = grey_thumbnail(image, (9, 8))
    return pack(pixels[:, 1:] > pixels[:, :-1])


def phash(image: Image.Image) -> np.uint64:
    """Perceptual hash: bit = one of the 8×8 lowest DCT frequencies of the 32×32 thumbnail above their median."""
    low = dctn(grey_thumbnail(image, (32, 32)), type=2, norm="ortho")[:8, :8]
    return pack(low > np.median(low))


def image_hashes(path: str | Path) -> tuple[np.uint64, np.uint64]:
    """(dHash, pHash) of the image at ``path``."""
    with Image.open(path) as image:
        return dhash(image), phash(image)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (len(a) × len(b)) between two arrays of 64-bit hashes."""
    return np.bitwise_count(np.bitwise_xor(a[:, None], b[None, :])).astype(np.int64)


def hash_table(paths: Iterable[str | Path]) -> np.ndarray:
    """N×2 uint64: (dHash, pHash) per path."""
    hashes = [image_hashes(p) for p in paths]
    return np.array(hashes, dtype=np.uint64).reshape(-1, 2)


def near_duplicates(train: pd.DataFrame, test: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Pairs (test image, training-side image) within ``max_distance`` on both hashes.

    ``train``/``test``: columns ``key``, ``side``, ``dhash``, ``phash`` (uint64). Sorted by distance.
    """
    if not len(train) or not len(test):
        return pd.DataFrame(columns=COLUMNS)
    d = hamming(test["dhash"].to_numpy(np.uint64), train["dhash"].to_numpy(np.uint64))
    p = hamming(test["phash"].to_numpy(np.uint64), train["phash"].to_numpy(np.uint64))
    i, j = np.nonzero((d <= max_distance) & (p <= max_distance))
    pairs = pd.DataFrame({"test_key": test["key"].to_numpy()[i], "train_key": train["key"].to_numpy()[j],
                          "test_side": test["side"].to_numpy()[i], "train_side": train["side"].to_numpy()[j],
                          "dhash_distance": d[i, j], "phash_distance": p[i, j]})
    return pairs.sort_values(["dhash_distance", "phash_distance", "test_key", "train_key"], ignore_index=True)


def sides(splits: dict) -> pd.DataFrame:
    """``key``, ``side`` for every image of the split: train, val (training side) and test/<dataset>."""
    rows = [(k, "train") for k in splits["train"]] + [(k, "val") for k in splits.get("val", [])]
    rows += [(k, f"test/{dataset}") for dataset, keys in splits["test"].items() for k in keys]
    return pd.DataFrame(rows, columns=["key", "side"])


def check(splits: dict, facts: pd.DataFrame, max_distance: int) -> tuple[pd.DataFrame, dict]:
    """Near-duplicate pairs across the split and a summary (images hashed, pairs, test images affected)."""
    table = sides(splits)
    paths = by_image_key(facts)["image_path"]
    hashes = hash_table(paths.loc[table["key"]])
    table = table.assign(dhash=hashes[:, 0], phash=hashes[:, 1])
    is_test = table["side"].str.startswith("test/")
    pairs = near_duplicates(table[~is_test], table[is_test], max_distance)
    per_test_set = {side.removeprefix("test/"): int(pairs.loc[pairs["test_side"] == side, "test_key"].nunique())
                    for side in sorted(table.loc[is_test, "side"].unique())}
    summary = {"hashed": int(len(table)), "max_distance": max_distance, "pairs": int(len(pairs)),
               "test_images_with_near_duplicate": per_test_set}
    return pairs, summary
