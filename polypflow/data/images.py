"""Images for training and evaluation: decode once, resize, cache as uint8 arrays, augment on the fly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from polypflow.io import atomic_path, read_json
from polypflow.settings.config import Ingest, Params

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # maps [0, 1] to [-1, 1]
}
# image file suffixes (lower case) for code without settings, such as the predict CLI: the default of
# ingest.image_extensions, spelt once in polypflow/settings/config.py (the layer below this one)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(Ingest.model_fields["image_extensions"].default)


def read_facts(params: Params) -> pd.DataFrame:
    """``data/facts.csv`` (validate's output): one row per image with its paths, sizes and content hashes."""
    return pd.read_csv(params.paths.facts, keep_default_na=False, dtype={"id": str})


def read_splits(params: Params) -> dict:
    """``data/splits.json`` (split's output): train, val, test per dataset, unseen datasets, folds."""
    return read_json(params.paths.splits)


def image_keys(facts: pd.DataFrame) -> pd.Series:
    """Each row's ``dataset/id``: the name splits.json, the image cache and the reports use for an image."""
    return facts["dataset"] + "/" + facts["id"].astype(str)


def by_image_key(facts: pd.DataFrame) -> pd.DataFrame:
    """``facts`` indexed by :func:`image_keys`."""
    return facts.set_index(image_keys(facts).rename("key"))


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 H×W×3; raises ``ValueError`` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError) as exc:  # PIL: SyntaxError for a broken PNG chunk
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def read_mask(path: str | Path, threshold: int) -> np.ndarray:
    """Binary uint8 H×W mask (0/1): grey value > ``threshold`` is polyp."""
    try:
        with Image.open(path) as img:
            return (np.asarray(img.convert("L")) > threshold).astype(np.uint8)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode mask ({exc})") from exc


@dataclass(frozen=True)
class ImageSet:
    """Resized images (N×S×S×3 uint8), masks (N×S×S uint8 0/1) and their ``dataset/id`` keys."""

    keys: list[str]
    images: np.ndarray
    masks: np.ndarray

    def subset(self, keys: list[str]) -> ImageSet:
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"images not in the cache: {missing[:5]}")
        rows = [index[k] for k in keys]
        return ImageSet(list(keys), self.images[rows], self.masks[rows])


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB image at the model's input size ``size``×``size`` (area interpolation): the one rule for images."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _resize_pair(image_path: str, mask_path: str, size: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    image = resize_image(read_image(image_path), size)
    mask = cv2.resize(read_mask(mask_path, threshold), (size, size), interpolation=cv2.INTER_NEAREST)
    return image, mask


def load_image_set(facts: pd.DataFrame, keys: list[str], size: int, threshold: int, cache_dir: Path) -> ImageSet:
    """Decoded, resized pairs for ``keys`` (``dataset/id``), cached on disk by content and size."""
    rows = by_image_key(facts).loc[keys]
    fingerprint = hashlib.sha256(json.dumps(
        [size, threshold, list(keys), rows["image_sha256"].tolist(), rows["mask_sha256"].tolist()]
    ).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{size}px-{fingerprint}.npz"
    if path.exists():
        with np.load(path) as cached:
            return ImageSet(list(keys), cached["images"], cached["masks"])
    pairs = [_resize_pair(r.image_path, r.mask_path, size, threshold) for r in rows.itertuples()]
    images = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, size, size, 3), np.uint8)
    masks = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, size, size), np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as out:
            np.savez(out, images=images, masks=masks)
    return ImageSet(list(keys), images, masks)


def augmentation(kind: str) -> A.Compose | None:
    """Albumentations pipeline: ``basic`` flips/rot90; ``strong`` adds affine, colour and noise."""
    if kind == "none":
        return None
    ops: list[A.BasicTransform] = [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
    if kind == "strong":
        ops += [
            A.Affine(scale=(0.85, 1.15), rotate=(-30, 30), translate_percent=(-0.05, 0.05), p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            A.Sharpen(p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        ]
    return A.Compose(ops)


def to_tensor(images: np.ndarray, normalize: str | tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """uint8 N×H×W×3 (or H×W×3) -> normalised float N×3×H×W (or 3×H×W); ``normalize`` names an entry of
    :data:`NORMALIZATION` or is its ``(mean, std)``."""
    mean, std = NORMALIZATION[normalize] if isinstance(normalize, str) else normalize
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.movedim(-1, -3).contiguous()


class SegDataset(Dataset):
    """(image, mask) float tensors from an :class:`ImageSet`, with optional augmentation."""

    def __init__(self, data: ImageSet, normalize: str, augment: str = "none") -> None:
        self.data = data
        self.normalize = normalize
        self.transform = augmentation(augment)

    def __len__(self) -> int:
        return len(self.data.keys)

    def augmented(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i``'s uint8 image and mask, through the augmentation when there is one."""
        image, mask = self.data.images[i], self.data.masks[i]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.augmented(i)
        return to_tensor(image, self.normalize), torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
