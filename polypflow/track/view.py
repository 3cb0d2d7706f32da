"""The MLflow UI's view of the methods side by side, as a link: ``python -m polypflow.track.view``.

The runs of stage ``register`` (one per method, named after it) carry each method's figures. This stores a view of
them with the UI's own sharing mechanism (experiment tag ``mlflow.sharedViewState.<key>``, opened by
``?viewStateShareKey=<key>``): the runs filtered to those rows, sorted by validation score (``val_score``: the
task's, a segmenter's Dice or a detector's AP50), with the test Dice,
meanDic and box AP50 (detectors' boxes, segmenters' mask components) of every test set, validation Dice, latency and size as columns, where a user looks first.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from mlflow import MlflowClient

from polypflow.data.images import read_splits
from polypflow.settings.config import Params, load_params
from polypflow.track import runs as tracking

STATE_TAG = "mlflow.sharedViewState."
FIGURES = ["val_score", "ort_p50_ms"]  # the UI orders metric columns by name: latency, the test sets', validation score


def view_state(datasets: list[str]) -> dict:
    """The shared view: register runs only, sorted by validation score, the figures as columns."""
    metrics = [f"test.{d}.{m}" for d in datasets for m in ("dice", "meanDic", "box_ap50")] + FIGURES
    return {
        "searchFilter": "tags.`polypflow.stage` = 'register'",
        "orderByKey": "metrics.`val_score`",
        "orderByAsc": False,
        "selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in metrics)],
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "viewMaximized": False,
        "runListHidden": False,
    }


def share(params: Params, datasets: list[str]) -> tuple[str, str]:
    """Store the view on the experiment; return (experiment id, share key). Idempotent: the key is the view's
    digest."""
    experiment_id = tracking.configure(params)
    state = json.dumps(view_state(datasets), sort_keys=True)
    key = hashlib.sha256(state.encode()).hexdigest()[:16]
    MlflowClient().set_experiment_tag(experiment_id, STATE_TAG + key, state)
    return experiment_id, key


def link(ui: str, experiment_id: str, key: str) -> str:
    """The runs page with the shared view. MLflow 3.17's UI takes the experiment's kind from a global switch (not
    from the ``mlflow.experimentKind`` tag) that defaults to GenAI and lands on its Overview, dropping the share
    key on the way: ``/runs`` with ``workflowType=machine_learning`` opens the runs table with the view applied
    (checked in headless Chromium)."""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={key}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--ui", default="http://127.0.0.1:5000", help="where `mlflow ui` serves (default: %(default)s)")
    args = p.parse_args()
    params = load_params(args.params)
    datasets = [d for d, keys in read_splits(params)["test"].items() if keys]
    print(link(args.ui, *share(params, datasets)))


if __name__ == "__main__":
    main()
