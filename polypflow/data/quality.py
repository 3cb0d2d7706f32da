"""Data quality: per-image facts, great-expectations suites over them, and a message per file at fault.

Every image and mask is decoded once to measure facts (readable, channels, sizes, share of grey mask
pixels, polyp area after thresholding, a mask scaled 0/1, a mask that looks inverted: its polyp lines all four
sides of the frame); exact duplicates are counted within and across datasets. Each failed check names the file
at fault (the mask for the mask's checks) and says what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from PIL import Image

from polypflow.settings.config import Validate

# per-image checks of the mask: they name the mask (the image when there is no mask)
MASK_CHECKS = frozenset({"mask_readable", "decoded_size_match", "ambiguous_fraction", "mask_scaled_0_1",
                         "mask_fraction", "likely_inverted"})
# dataset-level duplicate check -> (per-image column, its value for an image without copies)
DUPLICATE_COUNTS = {"duplicate_fraction_within": ("duplicates_within", 0),
                    "duplicates_across": ("datasets_sharing_image", 1)}


class ValidationFailed(ValueError):
    """The data failed its expectations; the message lists each failed check and offending files."""


def validate(manifest: pd.DataFrame, cfg: Validate, workers: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest's facts and the report of both suites: success, image count, per-dataset summary, checks."""
    facts = measure(manifest, cfg, workers)
    datasets = summary_by_dataset(facts)
    per_image, per_dataset = suites(cfg)
    image_checks = run_suite(facts.rename_axis("row").reset_index(), per_image, "images", "row")
    dataset_checks = run_suite(datasets, per_dataset, "datasets", "dataset")
    checks = name_image_files(image_checks, facts, cfg) + name_duplicate_files(dataset_checks, facts, datasets, cfg)
    report = {"success": all(c["success"] for c in checks), "images": len(facts),
              "datasets": datasets.to_dict(orient="records"), "checks": checks}
    return facts, report


# --- facts -------------------------------------------------------------------------------------------------


def image_facts(image_path: str, mask_path: str, threshold: int, band: tuple[int, int]) -> dict[str, Any]:
    """Decode one pair and measure what the suite checks; unreadable files are facts, not crashes."""
    facts = {"image_readable": False, "mask_readable": False, "channels": -1, "image_mode": "",
             "ambiguous_fraction": np.nan, "mask_fraction": np.nan, "border_fraction": np.nan,
             "least_side_fraction": np.nan, "mask_scaled_0_1": False, "decoded_size_match": False}
    image_size = mask_size = None
    if image_path:
        try:
            with Image.open(image_path) as img:
                img.load()
                facts.update(image_readable=True, channels=len(img.getbands()), image_mode=img.mode)
                image_size = img.size
        except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some broken PNGs
            facts["image_error"] = str(exc)
    if mask_path:
        try:
            with Image.open(mask_path) as img:
                grey = np.asarray(img.convert("L"))
            mask_size = grey.shape[::-1]
            facts.update(mask_readable=True, **mask_facts(grey, threshold, band))
        except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some broken PNGs
            facts["mask_error"] = str(exc)
    facts["decoded_size_match"] = image_size is not None and image_size == mask_size
    return facts


def mask_facts(grey: np.ndarray, threshold: int, band: tuple[int, int]) -> dict[str, Any]:
    """Shares of grey pixels, of polyp in the frame, on its edge (outermost pixel ring) and on the side of the
    frame that has least of it. A mask scaled 0/1, which the threshold reads as empty, is recognised as such; its
    polyp shares stay unmeasured (NaN), so it fails once, as a 0/1 mask, and not also as an empty one."""
    lo, hi = band
    polyp = grey > threshold
    edge = np.concatenate([polyp[0], polyp[-1], polyp[1:-1, 0], polyp[1:-1, -1]])
    sides = (polyp[0], polyp[-1], polyp[:, 0], polyp[:, -1])
    scaled_0_1 = threshold >= 1 and int(grey.max()) == 1
    return {"ambiguous_fraction": float(((grey > lo) & (grey < hi)).mean()),
            "mask_fraction": np.nan if scaled_0_1 else float(polyp.mean()),
            "border_fraction": np.nan if scaled_0_1 else float(edge.mean()),
            "least_side_fraction": np.nan if scaled_0_1 else float(min(side.mean() for side in sides)),
            "mask_scaled_0_1": scaled_0_1}


def likely_inverted(facts: pd.DataFrame, cfg: Validate) -> pd.Series:
    """Masks whose polyp lines every side of the frame: over ``cfg.inverted_side_fraction`` of each of the four
    sides. A polyp is a blob the camera looks at, which leaves at least one side of the frame clear; inverted,
    the colon wall around it becomes the "polyp" and lines all four. A mask beyond ``max_mask_fraction`` fails
    that check already ("an inverted mask?"), so it is not named twice."""
    within = facts["mask_fraction"] <= cfg.max_mask_fraction
    return within & (facts["least_side_fraction"] > cfg.inverted_side_fraction)


def measure(manifest: pd.DataFrame, cfg: Validate, workers: int = 2) -> pd.DataFrame:
    """The manifest with per-image facts and duplicate counts appended."""
    manifest = manifest.fillna({"image_path": "", "mask_path": "", "image_sha256": "", "mask_sha256": ""})
    args = [(row.image_path, row.mask_path, cfg.mask_threshold, cfg.ambiguous_band) for row in manifest.itertuples()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(_facts_star, args, chunksize=16))
    df = pd.concat([manifest.reset_index(drop=True), pd.DataFrame(facts)], axis=1)
    df["paired"] = (df["image_path"] != "") & (df["mask_path"] != "")
    df["file"] = df["image_path"].where(df["image_path"] != "", df["mask_path"])
    df["likely_inverted"] = likely_inverted(df, cfg)
    hashed = df["image_sha256"] != ""
    df["duplicates_within"] = 0
    df.loc[hashed, "duplicates_within"] = df[hashed].groupby(["dataset", "image_sha256"])["id"].transform("size") - 1
    df["datasets_sharing_image"] = 1
    df.loc[hashed, "datasets_sharing_image"] = df[hashed].groupby("image_sha256")["dataset"].transform("nunique")
    return df


def _facts_star(args: tuple[str, str, int, tuple[int, int]]) -> dict[str, Any]:
    return image_facts(*args)


def summary_by_dataset(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: share of images that are exact copies of another image of the same dataset."""
    hashed = df[df["image_sha256"] != ""]
    out = pd.DataFrame({"dataset": sorted(df["dataset"].unique())})
    out["images"] = out["dataset"].map(hashed.groupby("dataset").size()).fillna(0).astype(int)
    distinct = out["dataset"].map(hashed.groupby("dataset")["image_sha256"].nunique()).fillna(0)
    out["duplicate_fraction_within"] = (out["images"] - distinct) / out["images"].clip(lower=1)
    across = df[df["datasets_sharing_image"] > 1]
    out["duplicates_across"] = out["dataset"].map(across.groupby("dataset").size()).fillna(0).astype(int)
    return out


# --- the suites --------------------------------------------------------------------------------------------


def suites(cfg: Validate) -> tuple[list[gx.expectations.Expectation], list[gx.expectations.Expectation]]:
    """The expectations over per-image facts and over the per-dataset summary."""
    E = gx.expectations
    lo_side, hi_side = cfg.min_side, cfg.max_side
    per_image = [
        E.ExpectColumnValuesToBeInSet(column="paired", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="image_readable", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="mask_readable", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
        E.ExpectColumnValuesToBeInSet(column="decoded_size_match", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=lo_side, max_value=hi_side),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=lo_side, max_value=hi_side),
        E.ExpectColumnValuesToBeBetween(column="ambiguous_fraction", min_value=0, max_value=cfg.max_ambiguous_fraction),
        E.ExpectColumnValuesToBeInSet(column="mask_scaled_0_1", value_set=[False]),
        E.ExpectColumnValuesToBeBetween(column="mask_fraction", min_value=cfg.min_mask_fraction, max_value=cfg.max_mask_fraction),
        E.ExpectColumnValuesToBeInSet(column="likely_inverted", value_set=[False]),
        E.ExpectColumnValuesToBeUnique(column="file"),
    ]
    per_dataset = [
        E.ExpectColumnValuesToBeBetween(column="duplicate_fraction_within", min_value=0, max_value=cfg.max_duplicate_fraction_within),
        E.ExpectColumnValuesToBeBetween(column="duplicates_across", min_value=0, max_value=cfg.max_duplicates_across),
    ]
    return per_image, per_dataset


def run_suite(df: pd.DataFrame, expectations: list[gx.expectations.Expectation], name: str,
              key_column: str) -> list[dict[str, Any]]:
    """One check per expectation: its kwargs, success, and the ``key_column`` values of the rows failing it."""
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key_column]})
    checks = []
    for r in result.results:
        kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
        offenders = [u[key_column] for u in r.result.get("unexpected_index_list") or []]
        checks.append({"expectation": r.expectation_config.type, "kwargs": kwargs,
                       "success": bool(r.success), "unexpected_count": int(r.result.get("unexpected_count") or 0),
                       "offending": offenders, "messages": []})
    return checks


# --- the files at fault ------------------------------------------------------------------------------------


def at_fault(row: pd.Series, column: str) -> str:
    """The file a failed per-image check blames: the mask for the mask's checks (for a size mismatch, once the
    image is readable), the image for the others; whichever exists when the pair is incomplete."""
    mask_checked = column != "decoded_size_match" or row["image_readable"]
    return row["mask_path"] if column in MASK_CHECKS and row["mask_path"] and mask_checked else row["file"]


def name_image_files(checks: list[dict[str, Any]], facts: pd.DataFrame, cfg: Validate) -> list[dict[str, Any]]:
    """Per-image checks report rows; each becomes the file at fault and a message saying expected/found."""
    for check in checks:
        column = check["kwargs"]["column"]
        rows = facts.iloc[list(check["offending"])].iterrows()
        named = {at_fault(row, column): EXPLAIN[column](row, cfg) for _, row in rows}
        check.update(offending=list(named), messages=[f"{file}: {text}" for file, text in named.items()],
                     unexpected_count=len(named))
    return checks


def name_duplicate_files(checks: list[dict[str, Any]], facts: pd.DataFrame, datasets: pd.DataFrame,
                         cfg: Validate) -> list[dict[str, Any]]:
    """Duplicate checks run per dataset; report the duplicated image files of the failing datasets."""
    summary = datasets.set_index("dataset")
    for check in checks:
        check_column = check["kwargs"].get("column")
        count = DUPLICATE_COUNTS.get(check_column)
        if count and not check["success"]:
            column, alone = count
            copies = facts[facts["dataset"].isin(check["offending"]) & (facts[column] > alone)].sort_values("file")
            check["offending"] = copies["file"].tolist()
            check["messages"] = [f"{row.file}: {explain_duplicate(check_column, row, facts, summary, cfg)}"
                                 for row in copies.itertuples()]
            check["unexpected_count"] = len(check["offending"])
    return checks


def readable_failures(checks: list[dict[str, Any]], limit: int = 10) -> str:
    """Each failed check, then one line per file at fault (at most ``limit``; the report has them all)."""
    lines = []
    for c in (c for c in checks if not c["success"]):
        lines.append(f"{c['expectation']}({c['kwargs'].get('column')}): {c['unexpected_count']} failing:")
        lines += [f"  {message}" for message in c["messages"][:limit]]
        if len(c["messages"]) > limit:
            lines.append(f"  ... and {len(c['messages']) - limit} more in the report")
    return "\n".join(lines)


# --- what each failed check says about a file: expected, then found ---------------------------------------


def _pct(share: float) -> str:
    return f"{100 * share:.0f} %" if share == 0 or share >= 0.01 else f"{100 * share:.2g} %"


def _missing_or_unreadable(row: pd.Series, kind: str) -> str:
    if not row[f"{kind}_path"]:
        return f"expected {'an' if kind == 'image' else 'a'} {kind} with the stem {row['id']!r}, found none"
    error = row.get(f"{kind}_error")
    return f"expected a readable {kind}, found one that cannot be decoded ({error if isinstance(error, str) else '?'})"


def _channels(row: pd.Series, cfg: Validate) -> str:
    found = f"{row['channels']} ({row['image_mode']})" if row["channels"] >= 0 else "no readable image"
    return f"expected 3 channels, found {found}"


def _sizes(row: pd.Series, cfg: Validate) -> str:
    for kind in ("image", "mask"):
        if not row[f"{kind}_readable"]:
            return f"expected the image's size, found no readable {kind} to compare"
    return f"expected the image's size {row['width']}x{row['height']}, found {row['mask_width']}x{row['mask_height']}"


def _side(column: str) -> Callable[[pd.Series, Validate], str]:
    def explain(row: pd.Series, cfg: Validate) -> str:
        found = f"{row[column]} px" if row[column] >= 0 else "no readable image"
        return (f"expected a {column} of {cfg.min_side} to {cfg.max_side} px "
                f"(validate.min_side, validate.max_side), found {found}")
    return explain


def _ambiguous(row: pd.Series, cfg: Validate) -> str:
    lo, hi = cfg.ambiguous_band
    return (f"{_pct(row['ambiguous_fraction'])} of its pixels are grey (between {lo} and {hi}), expected at most "
            f"{_pct(cfg.max_ambiguous_fraction)} (validate.max_ambiguous_fraction)")


def _scaled_0_1(row: pd.Series, cfg: Validate) -> str:
    return (f"a mask scaled 0/1 (its only values are 0 and 1), expected 0/255: polyp is > validate.mask_threshold "
            f"{cfg.mask_threshold}, so it reads as empty; rescale it to 0/255 (Pillow: mask.point(lambda v: 255 * v))")


def _mask_fraction(row: pd.Series, cfg: Validate) -> str:
    share = _pct(row["mask_fraction"])
    if row["mask_fraction"] < cfg.min_mask_fraction:
        return (f"polyp covers {share} of the frame, expected at least {_pct(cfg.min_mask_fraction)} "
                "(validate.min_mask_fraction) — an empty mask?")
    return (f"polyp covers {share} of the frame, expected at most {_pct(cfg.max_mask_fraction)} "
            "(validate.max_mask_fraction) — an inverted mask?")


def _inverted(row: pd.Series, cfg: Validate) -> str:
    return (f"polyp covers {_pct(row['mask_fraction'])} of the frame and lines all four of its sides "
            f"({_pct(row['least_side_fraction'])} of the least covered one), expected a side at most "
            f"{_pct(cfg.inverted_side_fraction)} polyp, as a polyp leaves one clear (validate.inverted_side_fraction)"
            " — an inverted mask? Polyp must be the bright value")


EXPLAIN: dict[str, Callable[[pd.Series, Validate], str]] = {
    "paired": lambda row, cfg: _missing_or_unreadable(row, "mask" if row["image_path"] else "image"),
    "image_readable": lambda row, cfg: _missing_or_unreadable(row, "image"),
    "mask_readable": lambda row, cfg: _missing_or_unreadable(row, "mask"),
    "channels": _channels,
    "decoded_size_match": _sizes,
    "width": _side("width"),
    "height": _side("height"),
    "ambiguous_fraction": _ambiguous,
    "mask_scaled_0_1": _scaled_0_1,
    "mask_fraction": _mask_fraction,
    "likely_inverted": _inverted,
    "file": lambda row, cfg: "expected each file once in the manifest, found it more than once",
}


def explain_duplicate(column: str, row: Any, facts: pd.DataFrame, summary: pd.DataFrame, cfg: Validate) -> str:
    """A duplicated image (``row``: a facts row from ``itertuples``): which files it copies, and the dataset's
    share or count against its limit."""
    same = (facts["image_sha256"] == row.image_sha256) & (facts["file"] != row.file)
    if column == "duplicate_fraction_within":
        copies = sorted(facts.loc[same & (facts["dataset"] == row.dataset), "file"])
        return (f"an exact copy of {', '.join(copies)}; {_pct(summary.at[row.dataset, column])} of {row.dataset}'s "
                f"images are copies, expected at most {_pct(cfg.max_duplicate_fraction_within)} "
                "(validate.max_duplicate_fraction_within)")
    copies = sorted(facts.loc[same & (facts["dataset"] != row.dataset), "file"])
    return (f"the same image as {', '.join(copies)}; images shared with other datasets: "
            f"{summary.at[row.dataset, column]} in {row.dataset}, expected at most {cfg.max_duplicates_across} "
            "(validate.max_duplicates_across)")
