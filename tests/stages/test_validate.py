"""Stage validate: clean data passes; each kind of bad input fails naming the check and the file at fault (the
mask for the mask's checks), saying what was expected and what was found."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_params, stage_workdir, write_params
from PIL import Image, ImageDraw, ImageOps

from polypflow.data.quality import ValidationFailed
from polypflow.settings.config import load_params
from stages import ingest, validate

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


def almost_all_polyp(mask: Image.Image) -> Image.Image:
    """99 % polyp: white but for a small dark blob."""
    full = Image.new("L", mask.size, 255)
    ImageDraw.Draw(full).ellipse([28, 28, 34, 34], fill=0)
    return full


def polyp_on_the_left(mask: Image.Image) -> Image.Image:
    """A large polyp filling the left 40 columns: mostly polyp, touching the edge, yet not an inverted mask."""
    large = Image.new("L", mask.size, 0)
    large.paste(255, (0, 0, 40, mask.height))
    return large


def polyp_at_the_bottom(mask: Image.Image) -> Image.Image:
    """A large polyp cut by the frame's bottom edge: 24 % of the frame along 13 % of its edge, on one side only."""
    large = Image.new("L", mask.size, 0)
    ImageDraw.Draw(large).ellipse([14, 34, 52, 72], fill=255)
    return large


def inverted_polyp_at_the_bottom(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(polyp_at_the_bottom(mask))


G = "data/raw/gamma"
CASES = [  # id, damage, failed check (column), offending files it must name, what the message says about one of them
    ("truncated_jpeg", lambda r: truncate(r / "alpha/images/5.jpg"), "image_readable", ["data/raw/alpha/images/5.jpg"],
     "data/raw/alpha/images/5.jpg: expected a readable image, found one that cannot be decoded ("),
    ("png_random_bytes", lambda r: (r / "gamma/images/2.png").write_bytes(os.urandom(3000)),
     "image_readable", [f"{G}/images/2.png"],
     f"{G}/images/2.png: expected a readable image, found one that cannot be decoded (cannot identify image file"),
    ("mask_random_bytes", lambda r: (r / "gamma/masks/2.png").write_bytes(os.urandom(3000)),
     "mask_readable", [f"{G}/masks/2.png"],
     f"{G}/masks/2.png: expected a readable mask, found one that cannot be decoded (cannot identify image file"),
    ("image_without_mask", lambda r: (r / "gamma/masks/3.png").unlink(), "paired", [f"{G}/images/3.png"],
     f"{G}/images/3.png: expected a mask with the stem '3', found none"),
    ("mask_without_image", lambda r: (r / "gamma/images/4.png").unlink(), "paired", [f"{G}/masks/4.png"],
     f"{G}/masks/4.png: expected an image with the stem '4', found none"),
    ("size_mismatch", lambda r: edit(r / "gamma/masks/5.png", lambda m: m.resize((48, 48))),
     "decoded_size_match", [f"{G}/masks/5.png"], f"{G}/masks/5.png: expected the image's size 64x64, found 48x48"),
    ("grey_mask", lambda r: edit(r / "gamma/masks/6.png", grey_rows(16)), "ambiguous_fraction", [f"{G}/masks/6.png"],
     f"{G}/masks/6.png: 25 % of its pixels are grey (between 32 and 223), expected at most 5 % "
     "(validate.max_ambiguous_fraction)"),
    ("empty_mask", lambda r: edit(r / "gamma/masks/7.png", lambda m: Image.new("L", m.size, 0)),
     "mask_fraction", [f"{G}/masks/7.png"], f"{G}/masks/7.png: polyp covers 0 % of the frame, expected at least "
     "0.05 % (validate.min_mask_fraction) — an empty mask?"),
    ("mask_scaled_0_1", lambda r: edit(r / "gamma/masks/3.png", lambda m: m.point(lambda v: v // 255)),
     "mask_scaled_0_1", [f"{G}/masks/3.png"], f"{G}/masks/3.png: a mask scaled 0/1 (its only values are 0 and 1), "
     "expected 0/255: polyp is > validate.mask_threshold 127, so it reads as empty; rescale it to 0/255"),
    ("mask_almost_all_polyp", lambda r: edit(r / "gamma/masks/5.png", almost_all_polyp), "mask_fraction",
     [f"{G}/masks/5.png"], f"{G}/masks/5.png: polyp covers 99 % of the frame, expected at most 95 % "
     "(validate.max_mask_fraction) — an inverted mask?"),
    ("inverted_mask", lambda r: edit(r / "gamma/masks/5.png", ImageOps.invert), "likely_inverted", [f"{G}/masks/5.png"],
     f"{G}/masks/5.png: polyp covers 89 % of the frame and lines all four of its sides (100 % of the least covered "
     "one), expected a side at most 5 % polyp, as a polyp leaves one clear (validate.inverted_side_fraction) — an "
     "inverted mask? Polyp must be the bright value"),
    # issue 22: inverted, a large polyp at the edge leaves 76 % "polyp" along 87 % of the edge (the old rule's 90 %)
    ("inverted_polyp_at_the_edge", lambda r: edit(r / "gamma/masks/5.png", inverted_polyp_at_the_bottom),
     "likely_inverted", [f"{G}/masks/5.png"], f"{G}/masks/5.png: polyp covers 76 % of the frame and lines all four "
     "of its sides (48 % of the least covered one), expected a side at most 5 % polyp"),
    ("rgba_image", lambda r: edit(r / "gamma/images/8.png", lambda im: im.convert("RGBA")),
     "channels", [f"{G}/images/8.png"], f"{G}/images/8.png: expected 3 channels, found 4 (RGBA)"),
    ("greyscale_image", lambda r: edit(r / "gamma/images/9.png", lambda im: im.convert("L")),
     "channels", [f"{G}/images/9.png"], f"{G}/images/9.png: expected 3 channels, found 1 (L)"),
    ("image_too_small", lambda r: shrink(r, "10"), "width", [f"{G}/images/10.png"],
     f"{G}/images/10.png: expected a width of 32 to 4096 px (validate.min_side, validate.max_side), found 24 px"),
    ("duplicate_within", lambda r: copy_pair(r / "gamma", r / "gamma", "1", "11"),
     "duplicate_fraction_within", [f"{G}/images/1.png", f"{G}/images/11.png"],
     f"{G}/images/1.png: an exact copy of {G}/images/11.png; 9 % of gamma's images are copies, expected at most "
     "0 % (validate.max_duplicate_fraction_within)"),
    ("duplicate_across", lambda r: copy_pair(r / "beta", r / "gamma", "1", "11"),
     "duplicates_across", ["data/raw/beta/images/1.png", f"{G}/images/11.png"],
     f"data/raw/beta/images/1.png: the same image as {G}/images/11.png; images shared with other datasets: 1 in "
     "beta, expected at most 0 (validate.max_duplicates_across)"),
]
# a damaged mask whose content is at fault fails that one check, not also another one for the same fault
ALONE = {"size_mismatch", "grey_mask", "empty_mask", "mask_scaled_0_1", "mask_almost_all_polyp", "inverted_mask",
         "inverted_polyp_at_the_edge"}


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.quick
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
    """A little grey at a mask's edge, a large polyp at the frame's edge and a duplicate share within the
    configured thresholds are fine."""
    edit(data / "gamma/masks/6.png", grey_rows(2))  # 3 % grey, under max_ambiguous_fraction 5 %
    edit(data / "gamma/masks/7.png", polyp_on_the_left)  # 63 % polyp along 56 % of the edge: not inverted
    edit(data / "gamma/masks/8.png", polyp_at_the_bottom)  # 24 % polyp cut by the bottom edge: not inverted
    copy_pair(data / "gamma", data / "gamma", "1", "11")
    params = read_params(workdir)
    params["validate"]["max_duplicate_fraction_within"] = 0.1  # 1 of 11 gamma images is a copy
    write_params(workdir, params)
    assert len(ingest_and_validate()) == 51
    assert json.loads(REPORT.read_text())["success"] is True


@pytest.mark.parametrize(("case", "damage", "column", "offending", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_naming_file_and_check(workdir, data, case, damage, column, offending, says):
    damage(data)
    with pytest.raises(ValidationFailed) as err:
        ingest_and_validate()
    message = str(err.value)
    assert f"({column}): {len(offending)} failing:" in message, message
    assert all(f"\n  {path}: " in message for path in offending), message  # one line per file at fault
    assert says in message, message
    failed = failed_checks()
    assert sorted(failed[column]) == sorted(offending)  # the report lists exactly the offending files
    if case in ALONE:
        assert list(failed) == [column]
    messages = next(c["messages"] for c in json.loads(REPORT.read_text())["checks"] if c["kwargs"]["column"] == column)
    assert any(says in m for m in messages), messages
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
