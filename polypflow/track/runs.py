"""MLflow at the edges: one run per stage run, tracking URI resolved at run time (:mod:`polypflow.track.uri`).

The store is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` in params.yaml (SQLite under ``mlflow/`` by
default, artifacts in ``tracking.artifact_location``). Registration is :mod:`polypflow.track.registry`'s. Run ids cross process
boundaries through files written by the stages, never through MLflow's thread-local active run.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from polypflow.data.images import by_image_key, read_facts
from polypflow.settings.config import Params
from polypflow.track.uri import check_store, tracking_uri

# a model-training experiment: MLflow 3's UI then opens on the runs, not on the GenAI overview (traces, tokens)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "polypflow: one run per stage; the register runs (one per method, named "
                                          "after it) carry each method's validation and test Dice and latency."}
VAL_SCORES_ARTIFACT = "validation/val_per_image.csv"


def configure(params: Params) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = Path(params.tracking.artifact_location).resolve().as_uri() if local else None
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            return experiment_id
        except MlflowException:  # created meanwhile by another process
            experiment = mlflow.get_experiment_by_name(name)
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextlib.contextmanager
def stage_run(params: Params, stage: str, method: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage execution, tagged with stage, method, host and pid; a run of the same stage
    left RUNNING by a dead process is ended first (:func:`end_orphaned_runs`); an interrupt ends it as KILLED."""
    experiment_id = configure(params)
    end_orphaned_runs(experiment_id, stage, method)
    owner = {"polypflow.host": socket.gethostname(), "polypflow.pid": str(os.getpid())}
    all_tags = {"polypflow.stage": stage, **({"polypflow.method": method} if method else {}), **owner, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    name = run_name or (f"{stage}-{method}" if method else stage)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=all_tags, nested=nested) as run:
        try:
            yield run
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (stages._cli): KILLED, not FAILED
            mlflow.end_run("KILLED")
            raise


class StoreMismatch(FileNotFoundError):
    """The MLflow store does not hold the runs this project's outputs point at (deleted or replaced)."""


def require_run(params: Params, run_id: str, record: Path) -> None:
    """Before a stage works on the outputs of an earlier one: the store at the tracking URI must hold the run that
    ``record`` (its run.json) names, else the stage would log into a store that lost (or never had) its history."""
    uri = tracking_uri(params)
    check_store(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise StoreMismatch(f"no MLflow store at {uri.removeprefix('sqlite:///')}, but {record} names run {run_id} "
                            "logged there: was the store deleted? Restore it, or re-run the stages that log to it")
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code) and "not found" not in str(exc).lower():
            raise
        raise StoreMismatch(f"the MLflow store at {uri} has no run {run_id}, which {record} names: the store was "
                            "replaced (or MLFLOW_TRACKING_URI points elsewhere). Point it at the original store, or "
                            "re-run the stages that log to it (`dvc repro -f <stage>`)") from None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def end_orphaned_runs(experiment_id: str, stage: str, method: str | None) -> list[str]:
    """End as KILLED the runs of this stage (and method) still RUNNING whose process, on this host, is gone (a
    SIGKILL leaves a run RUNNING forever). Returns their ids."""
    client = MlflowClient()
    query = f"attributes.status = 'RUNNING' and tags.`polypflow.stage` = '{stage}'"
    if method:
        query += f" and tags.`polypflow.method` = '{method}'"
    ended = []
    for run in client.search_runs([experiment_id], query, max_results=100):
        tags = run.data.tags
        if tags.get("polypflow.host") == socket.gethostname() and not pid_alive(int(tags.get("polypflow.pid", "0") or 0)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


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


class EpochLogger:
    """Per-epoch metrics into the active MLflow run: live through :meth:`__call__` (a fit's ``on_epoch``),
    then :meth:`backfill` the epochs the fit restored from its checkpoint (a resumed run, or one whose
    epochs a flow's fan-out already trained), so every run carries its whole curve."""

    def __init__(self) -> None:
        self.logged: set[int] = set()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)
        self.logged.add(epoch)

    def backfill(self, history: list[dict[str, float]]) -> None:
        for row in history:
            if int(row["epoch"]) not in self.logged:
                self(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})


def log_image_sets(params: Params, sets: dict[str, list[str]]) -> None:
    """The images a run used, as MLflow dataset inputs (``context`` -> image keys): each a table of the images'
    keys and content hashes, so the UI's Dataset column names the set and its digest changes with the content."""
    facts = by_image_key(read_facts(params))
    scheme = params.split.scheme
    for context, keys in sets.items():
        rows = facts.loc[list(keys), ["image_sha256", "mask_sha256"]].reset_index() if keys else pd.DataFrame()
        dataset = mlflow.data.from_pandas(rows, source=str(params.paths.splits),
                                          name=f"{scheme}:{context} ({len(keys)} images)")
        mlflow.log_input(dataset, context=context)
