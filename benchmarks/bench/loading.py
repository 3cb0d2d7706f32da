"""Data loading: decoding the JPEGs every time vs the project's uint8 cache (``load_image_set``) + augmentation
through the trainer's ``DataLoader`` (per worker count) vs GPU-side flips/rot90, and whether the best CPU
loader keeps up with training."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench.common import MEAN, STD, Setup, failure
from polypflow.data.images import ImageSet, SegDataset, augmentation, load_image_set, read_image, read_mask, to_tensor


def synthetic_files(root: Path, n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """Kvasir-like JPEG frames (~620×530) with JPEG masks, when the real data is absent."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng, pairs = np.random.default_rng(seed), []
    yy, xx = np.mgrid[:530, :620]
    for i in range(n):
        cx, cy, r = rng.integers(150, 450), rng.integers(150, 380), rng.integers(40, 140)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        image = np.clip(np.array([180, 110, 100]) + rng.normal(0, 12, (530, 620, 3)), 0, 255)
        image[inside] *= [1.1, 0.7, 0.6]
        pair = (root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg")
        Image.fromarray(image.astype(np.uint8)).save(pair[0], quality=90)
        Image.fromarray((inside * 255).astype(np.uint8)).save(pair[1], quality=90)
        pairs.append(pair)
    return pairs


def data_pairs(root: Path | None, n: int, workdir: Path) -> tuple[list[tuple[Path, Path]], str]:
    """The first ``n`` image/mask pairs (sorted by name) of ``root``, else synthetic ones."""
    if root is not None and (root / "images").is_dir() and (root / "masks").is_dir():
        masks = {p.stem: p for p in (root / "masks").iterdir()}
        pairs = [(p, masks[p.stem]) for p in sorted((root / "images").iterdir()) if p.stem in masks][:n]
        if pairs:
            return pairs, f"real: {root} ({len(pairs)} pairs)"
    return synthetic_files(workdir / "synthetic", n), f"synthetic: {n} Kvasir-like 620x530 JPEG pairs"


def image_set(pairs: list[tuple[Path, Path]], size: int, cache: Path) -> ImageSet:
    """The project's uint8 cache (``load_image_set``) for ``pairs``."""
    import pandas as pd

    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    facts = pd.DataFrame({"dataset": "bench", "id": [str(i) for i in range(len(pairs))],
                          "image_path": [str(a) for a, _ in pairs], "mask_path": [str(b) for _, b in pairs],
                          "image_sha256": [sha(a) for a, _ in pairs], "mask_sha256": [sha(b) for _, b in pairs]})
    return load_image_set(facts, [f"bench/{i}" for i in range(len(pairs))], size, 127, cache)


def decode_each_time(pairs: list[tuple[Path, Path]], size: int, augment: str, passes: int) -> float:
    """images/s of decode (PIL) + resize (cv2) + augment + normalise, from the files every time."""
    import cv2

    transform = augmentation(augment)
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for image_path, mask_path in pairs:
            image = cv2.resize(read_image(image_path), (size, size), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(read_mask(mask_path, 127), (size, size), interpolation=cv2.INTER_NEAREST)
            if transform is not None:
                out = transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            to_tensor(image, "imagenet")
            count += 1
    return count / (time.perf_counter() - start)


def loader_throughput(data: ImageSet, augment: str, workers: int, batch: int, passes: int) -> float:
    """images/s of the trainer's DataLoader over the uint8 cache (one warm pass not counted)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(SegDataset(data, "imagenet", augment), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for x, _y in loader:
            count += len(x)
    return count / (time.perf_counter() - start)


def gpu_augment(data: ImageSet, device: torch.device, batch: int, passes: int) -> float:
    """images/s of uint8 upload + random flips/rot90 + normalisation on the GPU, per batch."""
    images = torch.from_numpy(data.images)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    count, start = 0, None
    for p in range(passes + 1):
        if p == 1:
            torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            flip = torch.rand(len(x), device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
            ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            count += len(x)
    torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def bench_data(root: Path | None, n: int, size: int, batch: int, workers: Sequence[int], setup: Setup) -> dict:
    """Decode-every-time vs uint8 cache + augment (per worker count) vs GPU-side augmentation."""
    pairs, source = data_pairs(root, n, setup.workdir)
    passes = 1 if setup.quick else 2
    report: dict[str, Any] = {"source": source, "items": len(pairs), "image_size": size, "batch": batch, "rows": []}
    start = time.perf_counter()
    data = image_set(pairs, size, setup.workdir / "cache")
    report["cache_build_images_per_s"] = len(pairs) / (time.perf_counter() - start)
    start = time.perf_counter()
    image_set(pairs, size, setup.workdir / "cache")
    report["cache_load_images_per_s"] = len(pairs) / (time.perf_counter() - start)
    cases: list[tuple[str, Callable[[], float]]] = []
    for augment in ("basic", "strong"):
        cases.append((f"decode_jpeg_each_time+{augment}", lambda a=augment: decode_each_time(pairs, size, a, passes)))
        for w in workers:
            cases.append((f"uint8_cache+{augment} workers={w}",
                          lambda a=augment, w=w: loader_throughput(data, a, w, batch, passes)))
    if setup.device.type == "cuda":
        cases.append(("gpu_flip_rot90 (uint8 cache)", lambda: gpu_augment(data, setup.device, batch, passes * 4)))
    for name, fn in cases:
        row = {"pipeline": name, "status": "ok"}
        try:
            row["images_per_s"] = fn()
        except Exception as exc:
            row["status"] = failure(exc)
        report["rows"].append(row)
        print(f"  data {name:>36} {row.get('images_per_s', float('nan')):9.1f} img/s  {row['status'][:60]}", flush=True)
    return report


def keeps_up(data: dict, training: list[dict]) -> list[dict]:
    """Best CPU loader (basic augmentation, uint8 cache) against each training throughput."""
    loaders = [r["images_per_s"] for r in data["rows"] if r["status"] == "ok" and r["pipeline"].startswith("uint8_cache+basic")]
    if not loaders:
        return []
    return [{"method": t["method"], "batch": t["batch"], "train_images_per_s": t["images_per_s"],
             "loader_images_per_s": max(loaders), "ratio": max(loaders) / t["images_per_s"]}
            for t in training if t["status"] == "ok" and t["image_size"] == data["image_size"]]
