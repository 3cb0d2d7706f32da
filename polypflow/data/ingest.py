"""Ingest: every configured dataset copied into one layout, and the manifest that describes it.

Layout: ``<raw>/<dataset>/{images,masks}/<stem><ext>`` (files copied byte-identical). The manifest has one row per
stem: dataset, id, group (the video sequence, or the image alone), paths, sizes, bytes, sha256. Masks are paired
with images by file stem; an unpaired file is kept with the other path empty, for validate to report.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from polypflow.data.fetch import SourceError, resolve_source
from polypflow.io import atomic_path, sha256_file
from polypflow.settings.config import DatasetSpec, Ingest, Params

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "dataset", "id", "group", "image_path", "mask_path", "width", "height", "mask_width", "mask_height",
    "image_bytes", "mask_bytes", "image_sha256", "mask_sha256",
]


def read_manifest(params: Params) -> pd.DataFrame:
    """``paths.manifest`` (ingest's output), ids as text and empty paths as empty strings."""
    return pd.read_csv(params.paths.manifest, keep_default_na=False, dtype={"id": str})


def build_manifest(cfg: Ingest, downloads: Path, raw: Path) -> pd.DataFrame:
    """Fetch every dataset of ``cfg`` (archives and downloads under ``downloads``), copy it under ``raw``; the
    manifest of all of them."""
    frames = []
    for key, spec in cfg.datasets.items():
        root = resolve_source(key, spec, downloads, cfg.root)
        frames.append(ingest_dataset(key, spec, root, raw, cfg.image_extensions))
    return pd.concat(frames, ignore_index=True)


def ingest_dataset(key: str, spec: DatasetSpec, root: Path, out: Path, extensions: list[str]) -> pd.DataFrame:
    """Dataset ``key`` (its files under ``root``) copied under ``out/key``; its manifest rows."""
    images = files_by_stem(root / spec.images, extensions)
    masks = files_by_stem(root / spec.masks, extensions)
    if not images:
        raise SourceError(f"{root / spec.images}: no images with extensions {extensions}")
    rows = []
    for stem in sorted(images.keys() | masks.keys()):
        image = _copy(images.get(stem), out / key / "images")
        mask = _copy(masks.get(stem), out / key / "masks")
        seq = sequence_of(stem, spec.sequences)
        group = f"{key}/seq{seq}" if seq is not None else f"{key}/{stem}"
        rows.append({"dataset": key, "id": stem, "group": group, **_pair_facts(image, mask)})
    log.info("%s: %d images, %d masks from %s", key, len(images), len(masks), root)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _pair_facts(image: Path | None, mask: Path | None) -> dict[str, Any]:
    """The manifest's paths, sizes, bytes and sha256 of a pair; a missing file has empty or -1/0 values."""
    width, height = _size(image)
    mask_width, mask_height = _size(mask)
    return {
        "image_path": str(image) if image else "", "mask_path": str(mask) if mask else "",
        "width": width, "height": height, "mask_width": mask_width, "mask_height": mask_height,
        "image_bytes": image.stat().st_size if image else 0, "mask_bytes": mask.stat().st_size if mask else 0,
        "image_sha256": sha256_file(image) if image else "", "mask_sha256": sha256_file(mask) if mask else "",
    }


def files_by_stem(folder: Path, extensions: list[str]) -> dict[str, Path]:
    """The files of ``folder`` with one of ``extensions`` (any case), by stem; two files of one stem are an error."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: expected folder is missing")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            _require_text_name(path)
            if path.stem in found:
                raise SourceError(f"{path}: two files share the stem {path.stem!r} ({found[path.stem].name})")
            found[path.stem] = path
    return found


def _require_text_name(path: Path) -> None:
    """The manifest, DVC and MLflow store names as UTF-8 text; a name that is not (raw bytes) is an error."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise SourceError(f"{shown}: file name is not valid UTF-8; rename the file") from None


def sequence_of(stem: str, sequences: list[tuple[int, int]]) -> int | None:
    """The 1-based video sequence of a numbered frame, from the dataset's frame ranges."""
    match = re.fullmatch(r"\d+", stem)
    if not sequences or not match:
        return None
    frame = int(stem)
    return next((i + 1 for i, (lo, hi) in enumerate(sequences) if lo <= frame <= hi), None)


def _size(path: Path | None) -> tuple[int, int]:
    if path is None:
        return -1, -1
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError):  # unreadable: recorded as -1, reported by validate with the file's name
        return -1, -1


def _copy(src: Path | None, dest_dir: Path) -> Path | None:
    """``src`` copied into ``dest_dir`` (atomically), unless an identical copy is there already."""
    if src is None:
        return None
    dest = dest_dir / src.name
    if not dest.exists() or dest.stat().st_size != src.stat().st_size or sha256_file(dest) != sha256_file(src):
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    return dest
