"""Stage 2, validate: a great-expectations suite over the manifest and per-image facts.

Every image and mask is decoded once to measure facts (readable, channels, sizes, share of grey mask
pixels, polyp area after thresholding, a mask scaled 0/1, a mask that looks inverted); exact duplicates are
counted within and across datasets (:mod:`polypflow.data.quality`). Writes ``paths.validation_report`` always
and ``paths.facts`` when the suite passes. A failing suite stops the pipeline; each failure names the file at
fault (the mask for the mask's checks) and says what was expected and what was found.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from polypflow.data.ingest import read_manifest
from polypflow.data.quality import ValidationFailed, readable_failures, validate
from polypflow.io import write_csv, write_json
from polypflow.settings.config import Params
from polypflow.track import runs as tracking
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def run(params: Params) -> pd.DataFrame:
    """Measure facts, run the suites, write facts and report; raise :class:`ValidationFailed` on failure."""
    facts, report = validate(read_manifest(params), params.validate_)
    write_json(params.paths.validation_report, report)
    log_to_mlflow(params, report)
    if not report["success"]:
        raise ValidationFailed(f"data validation failed (report: {params.paths.validation_report}):\n"
                               + readable_failures(report["checks"]))
    write_csv(params.paths.facts, facts.drop(columns=[c for c in facts.columns if c.endswith("_error")]))
    log.info("validation passed: %d images, %d checks", len(facts), len(report["checks"]))
    return facts


def log_to_mlflow(params: Params, report: dict[str, Any]) -> None:
    """The suite's outcome, failed or not, with the report as an artifact."""
    outcome = "passed" if report["success"] else "failed"
    with tracking.stage_run(params, "validate", tags={"polypflow.validation": outcome}):
        mlflow.log_params(tracking.flat("validate", params.validate_.model_dump()))
        mlflow.log_metrics({"images": report["images"], "checks": len(report["checks"]),
                            "failed_checks": sum(not c["success"] for c in report["checks"])})
        mlflow.log_artifact(str(params.paths.validation_report))


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
