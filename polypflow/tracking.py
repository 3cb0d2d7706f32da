"""MLflow at the edges: tracking URI at run time, one run per stage run, registry with aliases.

The URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` in params.yaml (SQLite under
``mlflow/`` by default, artifacts in ``tracking.artifact_location``). Run ids cross process
boundaries through files written by the stages, never through MLflow's thread-local active run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polypflow.config import Params

CHAMPION = "champion"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


def configure(params: Params) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = Path(params.tracking.artifact_location).resolve().as_uri() if local else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id


@contextlib.contextmanager
def stage_run(params: Params, stage: str, method: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage execution, tagged with stage, method and git commit when known."""
    import mlflow

    experiment_id = configure(params)
    all_tags = {"polypflow.stage": stage, **({"polypflow.method": method} if method else {}), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    name = run_name or (f"{stage}-{method}" if method else stage)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=all_tags, nested=nested) as run:
        yield run


def flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}`` for ``log_params``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat(name, value))
        else:
            out[name] = value
    return out


def champion_metric(name: str, metric: str) -> float | None:
    """``metric`` of the model version that holds alias ``champion`` of ``name``, if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = version.tags.get(metric)
    return float(value) if value is not None else None


def register(model_uri: str, name: str, tags: dict[str, Any], score: float, score_key: str = "val_dice") -> dict:
    """Register ``model_uri`` as a new version of ``name``; move ``champion`` to it if it scores best.

    Returns ``{"name", "version", "champion", "previous_champion_score"}``.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    previous = champion_metric(name, score_key)
    promote = previous is None or score > previous
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {"name": name, "version": int(version.version), "champion": promote, "previous_champion_score": previous}
