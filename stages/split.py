"""Stage 3, split: seeded, leakage-safe train/val/test splits and k-fold assignments -> ``splits.json``.

Schemes (``split.scheme``; :mod:`polypflow.data.splits`):

- ``pranet``: the PraNet protocol exactly, as the papers report on it: the test images are the ids listed in
  ``<split.test_lists>/<dataset>_test.txt`` (the authors' 100 Kvasir-SEG + 62 CVC-ClinicDB), every other image of those
  datasets is train (900 + 550 = 1450). The protocol is not leakage-safe (ClinicDB test frames have sequence
  mates in train); ``leakage_safe: false`` in splits.json says so and the report shows it.
- ``pranet_grouped``: the protocol's sizes (``split.pranet_train``) with whole video sequences and exact
  duplicates on one side: a leakage-safe variant that no paper reports.
- ``70_15_15`` and ``80_10_10``: train/val/test per dataset, sequences and duplicates kept whole.

In every scheme, validation for epoch selection is ``val_fraction_of_train`` of the training groups (whole
sequences), held out of the training images; the papers select on test. Images are grouped before splitting
(:mod:`polypflow.data.leakage`): frames of one video sequence (``ingest.datasets.*.sequences``) and exact
duplicates (same sha256, in any dataset) share a group. ``split.unseen`` datasets are test-only. Folds
(GroupKFold) cover train + val, so cross-validation never sees a test image.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from polypflow.data.images import read_facts
from polypflow.data.splits import make_splits, read_test_lists
from polypflow.io import write_json
from polypflow.settings.config import Params
from polypflow.track import runs as tracking
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    """Read the validated facts and write ``paths.splits``."""
    lists = read_test_lists(params.split) if params.split.scheme == "pranet" else None
    splits = make_splits(read_facts(params), params.split, params.seed, lists)
    write_json(params.paths.splits, splits)
    log_to_mlflow(params, splits)
    log.info("%s: train %d, val %d, test %s", params.split.scheme, len(splits["train"]), len(splits["val"]),
             {k: len(v) for k, v in splits["test"].items()})
    return splits


def log_to_mlflow(params: Params, splits: dict[str, Any]) -> None:
    """The scheme, seed and datasets; the size of each set; splits.json as an artifact."""
    with tracking.stage_run(params, "split"):
        mlflow.log_params({"scheme": params.split.scheme, "seed": params.seed, "folds": params.split.folds,
                           "datasets": ",".join(params.split.datasets), "unseen": ",".join(params.split.unseen)})
        mlflow.log_metrics({"train": len(splits["train"]), "val": len(splits["val"]),
                            **{f"test.{k}": len(v) for k, v in splits["test"].items()}})
        mlflow.log_artifact(str(params.paths.splits))


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
