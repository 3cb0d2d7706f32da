"""MLflow at the edges: tracking URI at run time, one run per stage run, registry with aliases.

The URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` in params.yaml (SQLite under
``mlflow/`` by default, artifacts in ``tracking.artifact_location``). Run ids cross process
boundaries through files written by the stages, never through MLflow's thread-local active run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from polypflow.config import Params, Promotion
from polypflow.stats import promotion_decision

CHAMPION = "champion"
# a model-training experiment: MLflow 3's UI then opens on the runs, not on the GenAI overview (traces, tokens)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "polypflow: one run per stage; the register runs (one per method, named "
                                          "after it) carry each method's validation and test Dice and latency."}
WEIGHTS_TAG = "weights_sha256"
VAL_SCORES_TAG = "val_per_image"
VAL_SCORES_ARTIFACT = "validation/val_per_image.csv"


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
    import mlflow

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
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
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
    from mlflow import MlflowClient

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
        import mlflow

        mlflow.log_metrics(metrics, step=epoch)
        self.logged.add(epoch)

    def backfill(self, history: list[dict[str, float]]) -> None:
        for row in history:
            if int(row["epoch"]) not in self.logged:
                self(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})


def champion_version(name: str) -> Any:
    """The model version of ``name`` holding alias ``champion`` (None without one)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_val_scores(version: Any) -> pd.Series | None:
    """Per-image validation scores a version was registered with (its ``val_per_image`` artifact: key and the
    score, a segmenter's Dice or a detector's box F1)."""
    import mlflow

    uri = version.tags.get(VAL_SCORES_TAG) if version is not None else None
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        table = pd.read_csv(path, dtype={"key": str})
    return table.set_index("key").iloc[:, 0]


def _decide(name: str, val_scores: pd.Series | None, score: float, score_key: str, promotion: Promotion,
            seed: int) -> dict:
    """Promotion decision of a challenger against the current champion of ``name``."""
    current = champion_version(name)
    if current is None:
        return {"promote": True, "reason": "no champion yet", "previous_version": None, "previous_score": None}
    previous = {"previous_version": int(current.version),
                "previous_score": float(current.tags[score_key]) if score_key in current.tags else None}
    champion_scores = version_val_scores(current)
    if val_scores is None or champion_scores is None:
        return {"promote": champion_scores is None and val_scores is not None,
                "reason": "no per-image validation scores to compare" + (" for the champion" if val_scores is not None
                                                                          else " for the challenger"), **previous}
    decision = promotion_decision(val_scores, champion_scores, promotion.n_boot, seed, promotion.confidence)
    return {**decision, **previous}


def _record(client: Any, name: str, version: str, scope: str, decision: dict, run_id: str | None) -> None:
    """Log a promotion decision as tags of the model version and of the register run."""
    tags = {f"promotion.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in decision.items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])
        if run_id:
            client.set_tag(run_id, f"promotion.{scope}.{key.removeprefix('promotion.')}", value[:5000])


def register_one(model_uri: str, name: str, tags: dict[str, Any], score: float, score_key: str,
                 val_scores: pd.Series | None, scores_uri: str | None, promotion: Promotion, seed: int,
                 run_id: str | None, scope: str) -> dict:
    """Register ``model_uri`` as a version of ``name``; move ``champion`` per :func:`_decide`."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    decision = _decide(name, val_scores, score, score_key, promotion, seed)  # before the new version exists
    all_tags = {**{k: str(v) for k, v in tags.items()}, **({VAL_SCORES_TAG: scores_uri} if scores_uri else {})}
    version = mlflow.register_model(model_uri, name, tags=all_tags)
    if decision["promote"]:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    _record(client, name, str(version.version), scope, decision, run_id)
    return {"name": name, "version": int(version.version), "champion": bool(decision["promote"]),
            "previous_champion_score": decision.get("previous_score"), "decision": decision}


def registered_with_weights(name: str, digest: str) -> Any:
    """The version of ``name`` whose weights digest is ``digest`` (None when these weights are not registered)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register(model_uri: str, name: str, tags: dict[str, Any], score: float, val_scores: pd.Series | None = None,
             scores_uri: str | None = None, run_id: str | None = None, promotion: Promotion | None = None,
             seed: int = 0, global_name: str | None = None, score_key: str = "val_dice") -> dict:
    """Register ``model_uri`` under ``name`` (and under ``global_name``, the cross-method model).

    ``champion`` of each moves to the new version only when :func:`polypflow.stats.promotion_decision`
    says so: its per-image validation Dice (``val_scores``, indexed by image key, logged at ``scores_uri``)
    beats the champion's on the same images by a paired bootstrap interval that excludes 0; the next challenger
    is compared image by image. Each decision (promoted, reason, CI) is a tag of the model version and of the
    register run ``run_id``. Weights already registered (same ``tags[WEIGHTS_TAG]``) are not registered again:
    the existing version is returned, marked ``"reused": true``. Returns ``{"name", "version", "champion",
    "previous_champion_score", "decision", "global": {...}}``.
    """
    promotion = promotion or Promotion()
    out = register_once(model_uri, name, tags, score, score_key, val_scores, scores_uri, promotion, seed, run_id,
                        "method")
    if global_name:
        global_tags = {**tags, "polypflow.method": name, "method_version": out["version"]}
        out["global"] = register_once(model_uri, global_name, global_tags, score, score_key, val_scores, scores_uri,
                                      promotion, seed, run_id, "global")
    return out


def register_once(model_uri: str, name: str, tags: dict[str, Any], score: float, score_key: str,
                  val_scores: pd.Series | None, scores_uri: str | None, promotion: Promotion, seed: int,
                  run_id: str | None, scope: str) -> dict:
    """:func:`register_one`, unless a version of ``name`` already holds these weights."""
    existing = registered_with_weights(name, str(tags[WEIGHTS_TAG])) if WEIGHTS_TAG in tags else None
    if existing is not None:
        champion = champion_version(name)
        return {"name": name, "version": int(existing.version), "reused": True,
                "champion": champion is not None and champion.version == existing.version,
                "previous_champion_score": None,
                "decision": {"promote": False, "reason": f"these weights are already version {existing.version}"}}
    return register_one(model_uri, name, tags, score, score_key, val_scores, scores_uri, promotion, seed, run_id, scope)


def log_image_sets(params: Params, sets: dict[str, list[str]]) -> None:
    """The images a run used, as MLflow dataset inputs (``context`` -> image keys): each a table of the images'
    keys and content hashes, so the UI's Dataset column names the set and its digest changes with the content."""
    import mlflow

    from polypflow.data import by_image_key
    from polypflow.layout import read_facts

    facts = by_image_key(read_facts(params))
    scheme = params.split.scheme
    for context, keys in sets.items():
        rows = facts.loc[list(keys), ["image_sha256", "mask_sha256"]].reset_index() if keys else pd.DataFrame()
        dataset = mlflow.data.from_pandas(rows, source=str(params.paths.splits),
                                          name=f"{scheme}:{context} ({len(keys)} images)")
        mlflow.log_input(dataset, context=context)
