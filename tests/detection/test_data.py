"""The detection dataset: boxes follow the image through flips and rot90; collate keeps boxes per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polypflow.data.images import ImageSet
from polypflow.data.boxes import mask_to_boxes
from polypflow.data.boxes import DetectionDataset, collate_detection, image_boxes

pytestmark = pytest.mark.quick

H, W = 40, 60


def two_polyps() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[5:15, 8:30] = 1  # 10 x 22
    mask[25:38, 40:47] = 1  # 13 x 7
    return mask


# each dihedral transform of the mask, and the same transform written on a box (x1, y1, x2, y2), by hand
TRANSFORMS = {
    "hflip": (lambda m: m[:, ::-1], lambda b: [W - b[2], b[1], W - b[0], b[3]]),
    "vflip": (lambda m: m[::-1], lambda b: [b[0], H - b[3], b[2], H - b[1]]),
    # np.rot90 (counter-clockwise): pixel (row r, col c) goes to (row W-1-c, col r), so x' = y, y' = W - x
    "rot90": (lambda m: np.rot90(m, 1), lambda b: [b[1], W - b[2], b[3], W - b[0]]),
    "rot180": (lambda m: np.rot90(m, 2), lambda b: [W - b[2], H - b[3], W - b[0], H - b[1]]),
    "rot270": (lambda m: np.rot90(m, 3), lambda b: [H - b[3], b[0], H - b[1], b[2]]),
    "transpose": (lambda m: m.T, lambda b: [b[1], b[0], b[3], b[2]]),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_boxes_of_a_transformed_mask_are_the_transformed_boxes(name):
    on_mask, on_box = TRANSFORMS[name]
    mask = two_polyps()
    expected = np.array([on_box(b) for b in mask_to_boxes(mask).boxes.tolist()], np.float32)
    np.testing.assert_array_equal(mask_to_boxes(np.ascontiguousarray(on_mask(mask))).boxes, expected)


def image_set(n: int) -> ImageSet:
    rng = np.random.default_rng(0)
    masks = np.stack([np.concatenate([two_polyps()[:, :30], two_polyps()[:, 37:47]], axis=1) for _ in range(n)])  # 40 x 40
    images = rng.integers(0, 255, (n, H, H, 3), dtype=np.uint8)
    return ImageSet([f"s/{i}" for i in range(n)], images, masks)


def test_dataset_without_augmentation_gives_the_mask_boxes():
    data = image_set(2)
    image, boxes = DetectionDataset(data, "imagenet")[0]
    assert image.shape == (3, H, H) and boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, torch.from_numpy(mask_to_boxes(data.masks[0]).boxes))


def test_augmented_boxes_are_those_of_the_augmented_mask():
    """With ``basic`` augmentation the boxes keep their sizes up to a transpose (flips and rot90)."""
    data = image_set(6)
    dataset = DetectionDataset(data, "imagenet", augment="basic", min_area=5)
    dataset.transform.set_random_seed(3)
    sides = sorted(np.diff(mask_to_boxes(data.masks[0]).boxes.reshape(-1, 2, 2), axis=1).ravel().tolist())
    for i in range(len(dataset)):
        _, boxes = dataset[i]
        assert sorted((boxes[:, 2:] - boxes[:, :2]).ravel().tolist()) == sides


def test_empty_mask_and_collate():
    data = image_set(2)
    data.masks[1][:] = 0
    batch = [DetectionDataset(data, "half")[i] for i in range(2)]
    images, boxes = collate_detection(batch)
    assert images.shape == (2, 3, H, H) and [len(b) for b in boxes] == [2, 0]
    assert [len(b) for b in image_boxes(data.masks, min_area=0)] == [2, 0]
