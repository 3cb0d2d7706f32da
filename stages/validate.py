"""Stage 2, validate: a great-expectations suite over the manifest and per-image facts.

Every image and mask is decoded once to measure facts (readable, channels, sizes, share of grey mask
pixels, polyp area after thresholding); exact duplicates are counted within and across datasets. A
failing suite writes the report (naming every offending file) and stops the pipeline.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from polypflow import tracking
from polypflow.config import Params, Validate
from polypflow.io import atomic_path, write_json
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


class ValidationFailed(ValueError):
    """The data failed its expectations; the message lists each failed check and offending files."""


def image_facts(image_path: str, mask_path: str, threshold: int, band: tuple[int, int]) -> dict:
    """Decode one pair and measure what the suite checks; unreadable files are facts, not crashes."""
    facts = {"image_readable": False, "mask_readable": False, "channels": -1, "image_mode": "",
             "ambiguous_fraction": np.nan, "mask_fraction": np.nan, "decoded_size_match": False}
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
            lo, hi = band
            facts.update(
                mask_readable=True,
                ambiguous_fraction=float(((grey > lo) & (grey < hi)).mean()),
                mask_fraction=float((grey > threshold).mean()),
            )
        except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some broken PNGs
            facts["mask_error"] = str(exc)
    facts["decoded_size_match"] = image_size is not None and image_size == mask_size
    return facts


def measure(manifest: pd.DataFrame, cfg: Validate, workers: int = 2) -> pd.DataFrame:
    """The manifest with per-image facts and duplicate counts appended."""
    manifest = manifest.fillna({"image_path": "", "mask_path": "", "image_sha256": "", "mask_sha256": ""})
    args = [(row.image_path, row.mask_path, cfg.mask_threshold, cfg.ambiguous_band) for row in manifest.itertuples()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(_facts_star, args, chunksize=16))
    df = pd.concat([manifest.reset_index(drop=True), pd.DataFrame(facts)], axis=1)
    df["paired"] = (df["image_path"] != "") & (df["mask_path"] != "")
    df["file"] = df["image_path"].where(df["image_path"] != "", df["mask_path"])
    hashed = df["image_sha256"] != ""
    df["duplicates_within"] = 0
    df.loc[hashed, "duplicates_within"] = df[hashed].groupby(["dataset", "image_sha256"])["id"].transform("size") - 1
    df["datasets_sharing_image"] = 1
    df.loc[hashed, "datasets_sharing_image"] = df[hashed].groupby("image_sha256")["dataset"].transform("nunique")
    return df


def _facts_star(args: tuple) -> dict:
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


def _suites(cfg: Validate):
    import great_expectations as gx

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
        E.ExpectColumnValuesToBeBetween(column="mask_fraction", min_value=cfg.min_mask_fraction, max_value=cfg.max_mask_fraction),
        E.ExpectColumnValuesToBeUnique(column="file"),
    ]
    per_dataset = [
        E.ExpectColumnValuesToBeBetween(column="duplicate_fraction_within", min_value=0, max_value=cfg.max_duplicate_fraction_within),
        E.ExpectColumnValuesToBeBetween(column="duplicates_across", min_value=0, max_value=cfg.max_duplicates_across),
    ]
    return per_image, per_dataset


def _validate(df: pd.DataFrame, expectations: list, name: str, key_column: str) -> list[dict]:
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key_column]})
    checks = []
    for r in result.results:
        kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
        offenders = [str(u[key_column]) for u in r.result.get("unexpected_index_list") or []]
        checks.append({"expectation": r.expectation_config.type, "kwargs": kwargs,
                       "success": bool(r.success), "unexpected_count": int(r.result.get("unexpected_count") or 0),
                       "offending": offenders})
    return checks


# dataset-level duplicate check -> (per-image column, its value for an image without copies)
DUPLICATE_COUNTS = {"duplicate_fraction_within": ("duplicates_within", 0),
                    "duplicates_across": ("datasets_sharing_image", 1)}


def name_duplicate_files(checks: list[dict], facts: pd.DataFrame) -> list[dict]:
    """Duplicate checks run per dataset; report the duplicated image files of the failing datasets."""
    for check in checks:
        count = DUPLICATE_COUNTS.get(check["kwargs"].get("column"))
        if count and not check["success"]:
            column, alone = count
            copies = facts["dataset"].isin(check["offending"]) & (facts[column] > alone)
            check["offending"] = sorted(facts.loc[copies, "file"])
            check["unexpected_count"] = len(check["offending"])
    return checks


def readable_failures(checks: list[dict], limit: int = 10) -> str:
    lines = []
    for c in (c for c in checks if not c["success"]):
        shown = ", ".join(c["offending"][:limit]) + (" ..." if len(c["offending"]) > limit else "")
        lines.append(f"{c['expectation']}({c['kwargs'].get('column')}): {c['unexpected_count']} failing: {shown}")
    return "\n".join(lines)


def log_to_mlflow(params: Params, report: dict) -> None:
    """The suite's outcome, failed or not, with the report as an artifact."""
    import mlflow

    with tracking.stage_run(params, "validate", tags={"polypflow.validation": "passed" if report["success"] else "failed"}):
        mlflow.log_params(tracking.flat("validate", params.validate_.model_dump()))
        mlflow.log_metrics({"images": report["images"], "checks": len(report["checks"]),
                            "failed_checks": sum(not c["success"] for c in report["checks"])})
        mlflow.log_artifact(str(params.paths.validation_report))


def run(params: Params) -> pd.DataFrame:
    """Measure facts, run the suites, write facts and report; raise :class:`ValidationFailed` on failure."""
    cfg = params.validate_
    manifest = pd.read_csv(params.paths.manifest, keep_default_na=False, dtype={"id": str})
    facts = measure(manifest, cfg)
    datasets = summary_by_dataset(facts)
    per_image, per_dataset = _suites(cfg)
    checks = _validate(facts, per_image, "images", "file") + name_duplicate_files(
        _validate(datasets, per_dataset, "datasets", "dataset"), facts)
    report = {"success": all(c["success"] for c in checks), "images": len(facts),
              "datasets": datasets.to_dict(orient="records"), "checks": checks}
    write_json(params.paths.validation_report, report)
    log_to_mlflow(params, report)
    if not report["success"]:
        raise ValidationFailed(f"data validation failed (report: {params.paths.validation_report}):\n"
                               + readable_failures(checks))
    with atomic_path(params.paths.facts, suffix=".csv") as tmp:
        facts.drop(columns=[c for c in facts.columns if c.endswith("_error")]).to_csv(tmp, index=False)
    log.info("validation passed: %d images, %d checks", len(facts), len(checks))
    return facts


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
