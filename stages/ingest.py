"""Stage 1, ingest: fetch every configured dataset and normalise it into one layout plus a manifest.

Layout: ``<paths.raw>/<dataset>/{images,masks}/<stem><ext>`` (files copied byte-identical), and
``paths.manifest`` (CSV: dataset, id, group, paths, sizes, bytes, sha256). Masks are paired with images
by file stem; an unpaired file is kept in the manifest with the other path empty, for validate to report.
The work is :mod:`polypflow.data.ingest`'s; sources (folder, archive, URL) are :mod:`polypflow.data.fetch`'s.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from polypflow.data.ingest import build_manifest
from polypflow.io import write_csv
from polypflow.settings.config import Params
from polypflow.track import runs as tracking
from stages._cli import main, parser, project_params


def run(params: Params) -> pd.DataFrame:
    """Fetch and normalise every dataset in ``params.ingest.datasets``; write and return the manifest."""
    manifest = build_manifest(params.ingest, params.paths.downloads, params.paths.raw)
    write_csv(params.paths.manifest, manifest)
    log_to_mlflow(params, manifest)
    return manifest


def log_to_mlflow(params: Params, manifest: pd.DataFrame) -> None:
    """Each dataset's source and image count, the unpaired files, the manifest as an artifact."""
    with tracking.stage_run(params, "ingest"):
        mlflow.log_params({f"source.{k}": getattr(s.source, "path", None) or s.source.url
                           for k, s in params.ingest.datasets.items()})
        mlflow.log_metrics({f"images.{k}": int((g["image_path"] != "").sum()) for k, g in manifest.groupby("dataset")})
        mlflow.log_metric("unpaired", int(((manifest["image_path"] == "") | (manifest["mask_path"] == "")).sum()))
        mlflow.log_artifact(str(params.paths.manifest))


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
