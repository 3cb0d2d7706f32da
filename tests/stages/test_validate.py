"""Stage validate: clean data passes; each kind of bad input fails naming the file and the failed check."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_params, stage_workdir, write_params
from PIL import Image

from polypflow.config import load_params
from stages import ingest, validate
from stages.validate import ValidationFailed

REPORT = Path("reports/validation.json")
FACTS = Path("data/facts.csv")


@pytest.fixture
def data(tmp_path, synthetic_root) -> Path:
    """A private copy of the synthetic datasets, free to damage."""
    return shutil.copytree(synthetic_root, tmp_path / "data-source")


@pytest.fixture
def workdir(tmp_path, data, monkeypatch) -> Path:
    """``project`` without DVC, over ``data``."""
    return stage_workdir(tmp_path, data, monkeypatch)


def ingest_and_validate() -> pd.DataFrame:
    params = load_params("params.yaml")
    ingest.run(params)
    return validate.run(params)


def failed_checks() -> dict[str, list[str]]:
    report = json.loads(REPORT.read_text())
    return {c["kwargs"]["column"]: c["offending"] for c in report["checks"] if not c["success"]}


# --- damage, one kind at a time -------------------------------------------------------------------------


def edit(path: Path, change: Callable[[Image.Image], Image.Image]) -> None:
    with Image.open(path) as img:
        changed = change(img.copy())
    changed.save(path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def grey_rows(rows: int) -> Callable[[Image.Image], Image.Image]:
    """Paint the top ``rows`` rows of a mask a grey that is neither polyp nor background."""
    def change(mask: Image.Image) -> Image.Image:
        mask.paste(100, (0, 0, mask.width, rows))
        return mask
    return change


def shrink(root: Path, stem: str) -> None:
    for folder in ("images", "masks"):
        edit(root / "gamma" / folder / f"{stem}.png", lambda im: im.resize((24, 24)))


def copy_pair(src: Path, dest: Path, src_stem: str, dest_stem: str) -> None:
    for folder in ("images", "masks"):
        shutil.copyfile(src / folder / f"{src_stem}.png", dest / folder / f"{dest_stem}.png")


G = "data/raw/gamma"
CASES = [  # id, damage, failed check (column), offending files it must name
    ("truncated_jpeg", lambda r: truncate(r / "alpha/images/5.jpg"), "image_readable", ["data/raw/alpha/images/5.jpg"]),
    ("png_random_bytes", lambda r: (r / "gamma/images/2.png").write_bytes(os.urandom(3000)),
     "image_readable", [f"{G}/images/2.png"]),
    ("mask_random_bytes", lambda r: (r / "gamma/masks/2.png").write_bytes(os.urandom(3000)),
     "mask_readable", [f"{G}/images/2.png"]),
    ("image_without_mask", lambda r: (r / "gamma/masks/3.png").unlink(), "paired", [f"{G}/images/3.png"]),
    ("mask_without_image", lambda r: (r / "gamma/images/4.png").unlink(), "paired", [f"{G}/masks/4.png"]),
    ("size_mismatch", lambda r: edit(r / "gamma/masks/5.png", lambda m: m.resize((48, 48))),
     "decoded_size_match", [f"{G}/images/5.png"]),
    ("grey_mask", lambda r: edit(r / "gamma/masks/6.png", grey_rows(16)), "ambiguous_fraction", [f"{G}/images/6.png"]),
    ("empty_mask", lambda r: edit(r / "gamma/masks/7.png", lambda m: Image.new("L", m.size, 0)),
     "mask_fraction", [f"{G}/images/7.png"]),
    ("rgba_image", lambda r: edit(r / "gamma/images/8.png", lambda im: im.convert("RGBA")),
     "channels", [f"{G}/images/8.png"]),
    ("greyscale_image", lambda r: edit(r / "gamma/images/9.png", lambda im: im.convert("L")),
     "channels", [f"{G}/images/9.png"]),
    ("image_too_small", lambda r: shrink(r, "10"), "width", [f"{G}/images/10.png"]),
    ("duplicate_within", lambda r: copy_pair(r / "gamma", r / "gamma", "1", "11"),
     "duplicate_fraction_within", [f"{G}/images/1.png", f"{G}/images/11.png"]),
    ("duplicate_across", lambda r: copy_pair(r / "beta", r / "gamma", "1", "11"),
     "duplicates_across", ["data/raw/beta/images/1.png", f"{G}/images/11.png"]),
]


# --- tests ----------------------------------------------------------------------------------------------


def test_clean_data_passes_and_writes_facts_and_report(workdir):
    facts = ingest_and_validate()
    assert len(facts) == 50
    report = json.loads(REPORT.read_text())
    assert report["success"] is True and report["images"] == 50
    assert all(c["success"] and c["offending"] == [] for c in report["checks"])
    assert {c["kwargs"]["column"] for c in report["checks"]} >= {case[2] for case in CASES}
    on_disk = pd.read_csv(FACTS, keep_default_na=False, dtype={"id": str})
    assert len(on_disk) == 50 and on_disk["paired"].all() and (on_disk["channels"] == 3).all()
    assert not any(c.endswith("_error") for c in on_disk.columns)


def test_tolerated_imperfections_pass(workdir, data):
    """A little grey at a mask's edge and a duplicate share within the configured thresholds are fine."""
    edit(data / "gamma/masks/6.png", grey_rows(2))  # 3 % grey, under max_ambiguous_fraction 5 %
    copy_pair(data / "gamma", data / "gamma", "1", "11")
    params = read_params(workdir)
    params["validate"]["max_duplicate_fraction_within"] = 0.1  # 1 of 11 gamma images is a copy
    write_params(workdir, params)
    assert len(ingest_and_validate()) == 51
    assert json.loads(REPORT.read_text())["success"] is True


@pytest.mark.parametrize(("damage", "column", "offending"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_naming_file_and_check(workdir, data, damage, column, offending):
    damage(data)
    with pytest.raises(ValidationFailed) as err:
        ingest_and_validate()
    message = str(err.value)
    failing_line = next((line for line in message.splitlines() if f"({column})" in line), None)
    assert failing_line is not None, f"check {column} not reported in:\n{message}"
    assert all(path in failing_line for path in offending), failing_line
    failed = failed_checks()
    assert sorted(failed[column]) == sorted(offending)  # the report lists exactly the offending files
    assert not FACTS.exists()


def test_failure_keeps_the_previous_facts(workdir, data):
    ingest_and_validate()
    good = FACTS.read_bytes()
    (data / "gamma/masks/3.png").unlink()
    with pytest.raises(ValidationFailed, match="paired"):
        ingest_and_validate()
    assert FACTS.read_bytes() == good
    report = json.loads(REPORT.read_text())
    assert report["success"] is False and report["images"] == 50
    missing_mask = [f"{G}/images/3.png"]
    assert failed_checks() == dict.fromkeys(["paired", "mask_readable", "decoded_size_match"], missing_mask)
