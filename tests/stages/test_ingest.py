"""Stage ingest: local folders, local archives and URL sources become one layout plus a manifest."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_params, stage_workdir, write_params
from http_server import FileServer

from polypflow.data.fetch import SourceError
from polypflow.data.ingest import MANIFEST_COLUMNS
from polypflow.io import sha256_file
from polypflow.settings.config import load_params
from stages import ingest

COUNTS = {"alpha": 24, "beta": 16, "gamma": 10}


@pytest.fixture
def workdir(tmp_path, synthetic_root, monkeypatch) -> Path:
    """``project`` without DVC, over the shared synthetic data."""
    return stage_workdir(tmp_path, synthetic_root, monkeypatch)


def set_dataset(root: Path, key: str, spec: dict, sources: Path | None = None) -> None:
    """Dataset ``key`` as ``spec``; a local source's path is given absolute here and made relative to ``sources``
    (the new ingest.root, which holds every other dataset too)."""
    params = read_params(root)
    if sources is not None:
        old_root = Path(params["ingest"]["root"])
        for other in params["ingest"]["datasets"].values():
            if other["source"]["kind"] == "local":
                other["source"]["path"] = os.path.relpath(old_root / other["source"]["path"], sources)
        spec["source"]["path"] = os.path.relpath(spec["source"]["path"], sources)
        params["ingest"]["root"] = str(sources)
    params["ingest"]["datasets"][key] = spec
    write_params(root, params)


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def assert_mirrors(manifest: pd.DataFrame, key: str, source: Path) -> None:
    """Dataset ``key`` holds exactly the source's pairs, copied byte-identical into data/raw."""
    rows = manifest[manifest["dataset"] == key]
    ids = sorted(p.stem for p in (source / "images").iterdir())
    assert sorted(rows["id"]) == ids
    for row in rows.itertuples():
        assert Path(row.image_path).parent == Path("data/raw") / key / "images"
        assert row.image_sha256 == sha256_file(source / "images" / Path(row.image_path).name)
        assert row.mask_sha256 == sha256_file(source / "masks" / Path(row.mask_path).name)


def test_synthetic_datasets_make_the_manifest(project, synthetic_root):
    manifest = ingest.run(load_params("params.yaml"))
    on_disk = pd.read_csv("data/manifest.csv", keep_default_na=False, dtype={"id": str})
    assert list(on_disk.columns) == MANIFEST_COLUMNS
    pd.testing.assert_frame_equal(on_disk, manifest, check_dtype=False)
    assert manifest["dataset"].value_counts().to_dict() == COUNTS
    for key in COUNTS:
        assert_mirrors(manifest, key, synthetic_root / key)
    for row in manifest.itertuples():  # the manifest describes the copies it points at
        assert sha256_file(row.image_path) == row.image_sha256 and sha256_file(row.mask_path) == row.mask_sha256
        assert Path(row.image_path).stat().st_size == row.image_bytes
        assert (row.width, row.height, row.mask_width, row.mask_height) == (64, 64, 64, 64)
    alpha = manifest[manifest["dataset"] == "alpha"]
    assert (alpha["group"] == "alpha/" + alpha["id"]).all()  # no sequences: every frame its own group
    assert alpha["image_path"].str.endswith(".jpg").all() and alpha["mask_path"].str.endswith(".jpg").all()
    beta = manifest[manifest["dataset"] == "beta"].set_index("id")["group"]
    assert beta.to_dict() == {str(i): f"beta/seq{(i - 1) // 4 + 1}" for i in range(1, 17)}


@pytest.mark.quick
def test_local_zip_archive_source(workdir, synthetic_root, tmp_path):
    archive = zip_folder(synthetic_root / "gamma", tmp_path / "gamma.zip")
    set_dataset(workdir, "gamma", {"name": "Gamma", "source": {"kind": "local", "path": str(archive)}},
                sources=tmp_path.parent)
    manifest = ingest.run(load_params("params.yaml"))
    assert (manifest["dataset"] == "gamma").sum() == COUNTS["gamma"]
    assert_mirrors(manifest, "gamma", synthetic_root / "gamma")
    assert (workdir / "data/downloads/gamma/images/1.png").is_file()


def test_url_source_is_downloaded_verified_and_extracted(workdir, synthetic_root, tmp_path):
    archive = zip_folder(synthetic_root / "gamma", tmp_path / "gamma.zip", prefix="Gamma-SEG/")
    data = archive.read_bytes()
    with FileServer() as server:
        server.files["gamma.zip"] = data
        source = {"kind": "url", "url": server.url("gamma.zip"), "sha256": hashlib.sha256(data).hexdigest(),
                  "subdir": "Gamma-SEG"}
        set_dataset(workdir, "gamma", {"name": "Gamma", "source": source})
        manifest = ingest.run(load_params("params.yaml"))
        assert server.ranges == [None]
        assert (workdir / "data/downloads/gamma.zip").read_bytes() == data
        ingest.run(load_params("params.yaml"))
        assert server.ranges == [None]  # the verified archive is not downloaded again
    assert (manifest["dataset"] == "gamma").sum() == COUNTS["gamma"]
    assert_mirrors(manifest, "gamma", synthetic_root / "gamma")


@pytest.mark.quick
def test_url_source_with_wrong_sha256_fails(workdir, synthetic_root, tmp_path):
    archive = zip_folder(synthetic_root / "gamma", tmp_path / "gamma.zip")
    with FileServer() as server:
        server.files["gamma.zip"] = archive.read_bytes()
        source = {"kind": "url", "url": server.url("gamma.zip"), "sha256": "a" * 64}
        set_dataset(workdir, "gamma", {"name": "Gamma", "source": source})
        with pytest.raises(SourceError, match="sha256 mismatch"):
            ingest.run(load_params("params.yaml"))
    assert not (workdir / "data/manifest.csv").exists()


def test_missing_source_folder_names_it(workdir, tmp_path):
    missing = tmp_path / "no-such-dataset"
    set_dataset(workdir, "gamma", {"name": "Gamma", "source": {"kind": "local", "path": str(missing)}},
                sources=tmp_path.parent)
    with pytest.raises(SourceError, match="does not exist") as err:
        ingest.run(load_params("params.yaml"))
    assert str(missing) in str(err.value) and "gamma" in str(err.value)
    assert not (workdir / "data/manifest.csv").exists()


def test_unpaired_files_are_kept_with_the_other_path_empty(workdir, synthetic_root, tmp_path):
    source = shutil.copytree(synthetic_root / "gamma", tmp_path / "gamma")
    (source / "masks" / "3.png").unlink()
    (source / "images" / "7.png").unlink()
    set_dataset(workdir, "gamma", {"name": "Gamma", "source": {"kind": "local", "path": str(source)}},
                sources=tmp_path.parent)
    gamma = ingest.run(load_params("params.yaml")).query("dataset == 'gamma'").set_index("id")
    assert len(gamma) == COUNTS["gamma"]
    no_mask, no_image = gamma.loc["3"], gamma.loc["7"]
    assert no_mask["image_path"].endswith("gamma/images/3.png") and no_mask["mask_path"] == ""
    assert (no_mask["mask_sha256"], no_mask["mask_width"], no_mask["mask_bytes"]) == ("", -1, 0)
    assert no_image["mask_path"].endswith("gamma/masks/7.png") and no_image["image_path"] == ""
    assert (no_image["image_sha256"], no_image["width"]) == ("", -1)


def test_rerun_is_idempotent(workdir):
    params = load_params("params.yaml")
    first = ingest.run(params)
    before = {p: p.stat().st_mtime_ns for p in Path("data/raw").rglob("*") if p.is_file()}
    manifest_bytes = Path("data/manifest.csv").read_bytes()
    second = ingest.run(params)
    pd.testing.assert_frame_equal(first, second)
    assert Path("data/manifest.csv").read_bytes() == manifest_bytes
    after = {p: p.stat().st_mtime_ns for p in Path("data/raw").rglob("*") if p.is_file()}
    assert after == before  # unchanged copies are not rewritten
    assert len(before) == 2 * sum(COUNTS.values())
