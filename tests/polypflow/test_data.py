"""Decoding, resizing, binarising and caching image sets; corrupt files; aligned augmentation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from polypflow.data.images import ImageSet, SegDataset, load_image_set, read_image, read_mask, to_tensor
from polypflow.io import sha256_file
from tests.conftest import make_dataset, make_pair

pytestmark = pytest.mark.quick


def facts_of(root: Path, n: int, dataset: str = "alpha") -> pd.DataFrame:
    rows = []
    for i in range(1, n + 1):
        image, mask = root / "images" / f"{i}.png", root / "masks" / f"{i}.png"
        rows.append({"dataset": dataset, "id": i, "image_path": str(image), "mask_path": str(mask),
                     "image_sha256": sha256_file(image), "mask_sha256": sha256_file(mask)})
    return pd.DataFrame(rows)


@pytest.fixture
def source(tmp_path) -> tuple[Path, pd.DataFrame, list[str]]:
    root = make_dataset(tmp_path / "alpha", 4, seed=5)
    return root, facts_of(root, 4), [f"alpha/{i}" for i in (3, 1, 4, 2)]


def test_load_image_set_resizes_in_key_order(source, tmp_path):
    root, facts, keys = source
    data = load_image_set(facts, keys, 32, 127, tmp_path / "cache")
    assert data.keys == keys
    assert data.images.shape == (4, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (4, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    for row, key in enumerate(keys):
        i = key.split("/")[1]
        original = np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB")).astype(float)
        area_mean = original.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))  # INTER_AREA halving is a 2x2 mean
        assert np.abs(data.images[row] - area_mean).max() <= 1
        original_mask = np.asarray(Image.open(root / "masks" / f"{i}.png")) > 127
        assert data.masks[row].mean() == pytest.approx(original_mask.mean(), abs=0.03)


def test_masks_are_binarised_with_the_threshold(tmp_path):
    root = tmp_path / "grey"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    make_pair(0)[0].save(root / "images" / "1.png")
    grey = np.repeat(np.array([0, 100, 127, 128, 200, 255], np.uint8), 8)  # 6 stripes of 8 columns
    Image.fromarray(np.tile(grey, (48, 1))).save(root / "masks" / "1.png")
    Image.open(root / "images" / "1.png").resize((48, 48)).save(root / "images" / "1.png")
    facts = facts_of(root, 1, "grey")
    strict = load_image_set(facts, ["grey/1"], 48, 127, tmp_path / "cache")
    np.testing.assert_array_equal(strict.masks[0][0], np.repeat([0, 0, 0, 1, 1, 1], 8))
    loose = load_image_set(facts, ["grey/1"], 48, 99, tmp_path / "cache")
    np.testing.assert_array_equal(loose.masks[0][0], np.repeat([0, 1, 1, 1, 1, 1], 8))
    np.testing.assert_array_equal(read_mask(root / "masks" / "1.png", 127)[0], np.repeat([0, 0, 0, 1, 1, 1], 8))


def test_second_load_reads_the_cache(source, tmp_path):
    root, facts, keys = source
    cache = tmp_path / "cache"
    first = load_image_set(facts, keys, 32, 127, cache)
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("32px-") and files[0].suffix == ".npz"
    mtime = files[0].stat().st_mtime_ns
    for path in [*(root / "images").iterdir(), *(root / "masks").iterdir()]:
        path.unlink()  # only the cache can answer now
    second = load_image_set(facts, keys, 32, 127, cache)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.masks, first.masks)
    assert second.keys == keys
    assert sorted(cache.iterdir()) == files and files[0].stat().st_mtime_ns == mtime


def test_changed_content_size_threshold_or_keys_get_new_cache_files(source, tmp_path):
    root, facts, keys = source
    cache = tmp_path / "cache"
    load_image_set(facts, keys, 32, 127, cache)
    image, _ = make_pair(999)  # the dataset is re-released with a different frame 1
    image.save(root / "images" / "1.png")
    changed = facts_of(root, 4)
    assert changed.loc[0, "image_sha256"] != facts.loc[0, "image_sha256"]
    fresh = load_image_set(changed, keys, 32, 127, cache)
    assert len(list(cache.iterdir())) == 2
    row = keys.index("alpha/1")
    area_mean = np.asarray(image, float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(fresh.images[row] - area_mean).max() <= 1  # the new frame, not the stale cached one
    load_image_set(changed, keys, 48, 127, cache)
    load_image_set(changed, keys, 32, 100, cache)
    load_image_set(changed, keys[:2], 32, 127, cache)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 5 and sum(n.startswith("48px-") for n in names) == 1
    assert not any(n.startswith(".") for n in names)  # atomic writes left no temporary file


def test_empty_key_list(source, tmp_path):
    _, facts, _ = source
    data = load_image_set(facts, [], 32, 127, tmp_path / "cache")
    assert data.images.shape == (0, 32, 32, 3) and data.masks.shape == (0, 32, 32)


def test_subset(source, tmp_path):
    _, facts, keys = source
    data = load_image_set(facts, keys, 32, 127, tmp_path / "cache")
    part = data.subset(["alpha/2", "alpha/3"])
    np.testing.assert_array_equal(part.images[0], data.images[keys.index("alpha/2")])
    np.testing.assert_array_equal(part.masks[1], data.masks[keys.index("alpha/3")])
    with pytest.raises(KeyError, match="alpha/9"):
        data.subset(["alpha/1", "alpha/9"])


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    make_pair(1)[0].save(buffer, "PNG")
    return buffer.getvalue()


def corrupt(kind: str) -> bytes:
    data = png_bytes()
    if kind == "random_bytes":
        return np.random.default_rng(0).bytes(2048)
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "garbled_stream":
        middle = len(data) // 2
        return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
    assert kind == "broken_chunk_length"  # PIL raises SyntaxError here, not OSError
    broken = bytearray(data)
    broken[data.index(b"IDAT") - 1] ^= 0x5A
    return bytes(broken)


@pytest.mark.parametrize("kind", ["random_bytes", "empty", "truncated", "garbled_stream", "broken_chunk_length"])
def test_corrupt_file_raises_value_error_naming_it(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    path.write_bytes(corrupt(kind))
    with pytest.raises(ValueError, match=str(path)):
        read_image(path)
    with pytest.raises(ValueError, match=str(path)):
        read_mask(path, 127)


def test_missing_file_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_read_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 3), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (5, 3), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    grey, rgba = read_image(tmp_path / "grey.png"), read_image(tmp_path / "rgba.png")
    assert grey.shape == rgba.shape == (3, 5, 3) and grey.dtype == np.uint8
    assert (grey == 77).all() and (rgba == [1, 2, 3]).all()


def crafted_set(n: int = 6) -> ImageSet:
    """An asymmetric "L" polyp; the image is white exactly where the mask is 1, black elsewhere."""
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 4:10] = 1
    mask[22:28, 4:20] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    return ImageSet([f"x/{i}" for i in range(n)], np.stack([image] * n), np.stack([mask] * n))


@pytest.mark.parametrize("augment", ["basic", "strong"])
def test_augmentation_keeps_image_and_mask_aligned(augment):
    data = crafted_set(8)
    dataset = SegDataset(data, "half", augment)
    dataset.transform.set_random_seed(0)
    changed = 0
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32) and y.dtype == torch.float32
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        white = x.mean(dim=0) > 0  # "half": 0 -> -1, 255 -> 1
        agreement = (white == (y[0] > 0)).float().mean().item()
        assert agreement == 1.0 if augment == "basic" else agreement > 0.95
        changed += not torch.equal(y[0], torch.from_numpy(data.masks[i]).float())
    assert changed >= 4  # the flips/rotations really happened, to image and mask alike


def test_no_augmentation_and_normalisation():
    data = crafted_set(1)
    x, y = SegDataset(data, "half", "none")[0]
    torch.testing.assert_close(y[0], torch.from_numpy(data.masks[0]).float())
    assert set(torch.unique(x).tolist()) == {-1.0, 1.0}
    batch = to_tensor(data.images, "imagenet")
    assert batch.shape == (1, 3, 32, 32)
    assert batch[0, 0, 0, 0].item() == pytest.approx((0 - 0.485) / 0.229, rel=1e-6)
    assert batch[0, 2, 4, 4].item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-6)
