"""Stage 1, ingest: fetch every configured dataset and normalise it into one layout plus a manifest.

Layout: ``<paths.raw>/<dataset>/{images,masks}/<stem><ext>`` (files copied byte-identical), and
``paths.manifest`` (CSV: dataset, id, group, paths, sizes, bytes, sha256). Masks are paired with images
by file stem; an unpaired file is kept in the manifest with the other path empty, for validate to report.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

from polypflow import tracking
from polypflow.config import DatasetSpec, Params
from polypflow.fetch import SourceError, download, extract, is_archive
from polypflow.io import atomic_path, sha256_file
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "dataset", "id", "group", "image_path", "mask_path", "width", "height", "mask_width", "mask_height",
    "image_bytes", "mask_bytes", "image_sha256", "mask_sha256",
]


def resolve_source(key: str, spec: DatasetSpec, downloads: Path, root: Path = Path(".")) -> Path:
    """The local folder holding dataset ``key``: the source folder (under ``root``), or a downloaded/extracted
    archive."""
    if spec.source.kind == "url":
        name = Path(spec.source.url.split("?")[0]).name or f"{key}.zip"
        archive = download(spec.source.url, downloads / name, spec.source.sha256)
        return extract(archive, downloads / key) / spec.source.subdir
    path = Path(root) / spec.source.path
    if not path.exists():
        raise SourceError(f"{path}: dataset {key} ({spec.name}) source does not exist")
    if path.is_file():
        if not is_archive(path):
            raise SourceError(f"{path}: dataset {key} source is a file but not a known archive type")
        return extract(path, downloads / key)
    return path


def _files_by_stem(folder: Path, extensions: list[str]) -> dict[str, Path]:
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
    if src is None:
        return None
    dest = dest_dir / src.name
    if not dest.exists() or dest.stat().st_size != src.stat().st_size or sha256_file(dest) != sha256_file(src):
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    return dest


def ingest_dataset(key: str, spec: DatasetSpec, root: Path, out: Path, extensions: list[str]) -> pd.DataFrame:
    images = _files_by_stem(root / spec.images, extensions)
    masks = _files_by_stem(root / spec.masks, extensions)
    if not images:
        raise SourceError(f"{root / spec.images}: no images with extensions {extensions}")
    rows = []
    for stem in sorted(images.keys() | masks.keys()):
        image = _copy(images.get(stem), out / key / "images")
        mask = _copy(masks.get(stem), out / key / "masks")
        seq = sequence_of(stem, spec.sequences)
        width, height = _size(image)
        mask_width, mask_height = _size(mask)
        rows.append({
            "dataset": key, "id": stem,
            "group": f"{key}/seq{seq}" if seq is not None else f"{key}/{stem}",
            "image_path": str(image) if image else "", "mask_path": str(mask) if mask else "",
            "width": width, "height": height, "mask_width": mask_width, "mask_height": mask_height,
            "image_bytes": image.stat().st_size if image else 0, "mask_bytes": mask.stat().st_size if mask else 0,
            "image_sha256": sha256_file(image) if image else "", "mask_sha256": sha256_file(mask) if mask else "",
        })
    log.info("%s: %d images, %d masks from %s", key, len(images), len(masks), root)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def run(params: Params) -> pd.DataFrame:
    """Fetch and normalise every dataset in ``params.ingest.datasets``; write and return the manifest."""
    frames = []
    for key, spec in params.ingest.datasets.items():
        root = resolve_source(key, spec, params.paths.downloads, params.ingest.root)
        frames.append(ingest_dataset(key, spec, root, params.paths.raw, params.ingest.image_extensions))
    manifest = pd.concat(frames, ignore_index=True)
    with atomic_path(params.paths.manifest, suffix=".csv") as tmp:
        manifest.to_csv(tmp, index=False)
    log_to_mlflow(params, manifest)
    return manifest


def log_to_mlflow(params: Params, manifest: pd.DataFrame) -> None:
    import mlflow

    with tracking.stage_run(params, "ingest"):
        mlflow.log_params({f"source.{k}": getattr(s.source, "path", None) or s.source.url
                           for k, s in params.ingest.datasets.items()})
        mlflow.log_metrics({f"images.{k}": int((g["image_path"] != "").sum()) for k, g in manifest.groupby("dataset")})
        mlflow.log_metric("unpaired", int(((manifest["image_path"] == "") | (manifest["mask_path"] == "")).sum()))
        mlflow.log_artifact(str(params.paths.manifest))


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
