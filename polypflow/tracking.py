"""MLflow at the edges: tracking URI at run time, one run per stage run, registry with aliases.

The URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` in params.yaml (SQLite under
``mlflow/`` by default, artifacts in ``tracking.artifact_location``). Run ids cross process
boundaries through files written by the stages, never through MLflow's thread-local active run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from polypflow.config import Params, Promotion
from polypflow.stats import promotion_decision

CHAMPION = "champion"
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
    """Per-image validation Dice a version was registered with (its ``val_per_image`` artifact)."""
    import mlflow

    uri = version.tags.get(VAL_SCORES_TAG) if version is not None else None
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        table = pd.read_csv(path, dtype={"key": str})
    return table.set_index("key")["dice"]


def _decide(name: str, val_scores: pd.Series | None, score: float, score_key: str, promotion: Promotion,
            seed: int) -> dict:
    """Promotion decision of a challenger against the current champion of ``name``."""
    current = champion_version(name)
    if current is None:
        return {"promote": True, "reason": "no champion yet", "previous_version": None, "previous_score": None}
    previous = {"previous_version": int(current.version),
                "previous_score": float(current.tags[score_key]) if score_key in current.tags else None}
    champion_scores = version_val_scores(current)
    if val_scores is None or champion_scores is None:  # versions registered before per-image scores were kept
        promote = previous["previous_score"] is None or score > previous["previous_score"]
        return {"promote": promote, "reason": "no per-image validation scores to compare; mean val Dice decides",
                **previous}
    decision = promotion_decision(val_scores, champion_scores, promotion.n_boot, seed, promotion.confidence)
    return {**decision, **previous}


def _record(client: Any, name: str, version: str, scope: str, decision: dict, run_id: str | None) -> None:
    """Log a promotion decision as tags of the model version and of the training run."""
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


def register(model_uri: str, name: str, tags: dict[str, Any], score: float, score_key: str = "val_dice",
             val_scores: pd.Series | None = None, run_id: str | None = None, promotion: Promotion | None = None,
             seed: int = 0, global_name: str | None = None) -> dict:
    """Register ``model_uri`` under ``name`` (and under ``global_name``, the cross-method model).

    ``champion`` of each moves to the new version only when :func:`polypflow.stats.promotion_decision`
    says so: its per-image validation Dice (``val_scores``, indexed by image key) beats the champion's
    on the same images by a paired bootstrap interval that excludes 0. The scores are logged to the
    training run ``run_id`` (``validation/val_per_image.csv``) and the version points at them, so the
    next challenger is compared image by image. Each decision (promoted, reason, CI) is a tag of the
    model version and of the run. Returns ``{"name", "version", "champion", "previous_champion_score",
    "decision", "global": {...}}``.
    """
    from mlflow import MlflowClient

    promotion = promotion or Promotion()
    scores_uri = None
    if val_scores is not None and run_id:
        table = val_scores.rename("dice").rename_axis("key").reset_index()
        MlflowClient().log_text(run_id, table.to_csv(index=False), VAL_SCORES_ARTIFACT)
        scores_uri = f"runs:/{run_id}/{VAL_SCORES_ARTIFACT}"
    out = register_one(model_uri, name, tags, score, score_key, val_scores, scores_uri, promotion, seed, run_id,
                       "method")
    if global_name:
        global_tags = {**tags, "polypflow.method": name, "method_version": out["version"]}
        if run_id:
            global_tags["onnx"] = f"runs:/{run_id}/onnx/model.onnx"  # logged there by export@<method>
        out["global"] = register_one(model_uri, global_name, global_tags, score, score_key, val_scores, scores_uri,
                                     promotion, seed, run_id, "global")
    return out
