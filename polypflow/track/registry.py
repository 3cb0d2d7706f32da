"""The model registry: every trained model registered under its method's name and its task's cross-method name,
``champion`` moved only on a significant paired-bootstrap gain in per-image validation score, the same weights never
registered twice."""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from polypflow.evaluate.stats import promotion_decision
from polypflow.settings.config import Promotion

CHAMPION = "champion"
WEIGHTS_TAG = "weights_sha256"
VAL_SCORES_TAG = "val_per_image"


def champion_version(name: str) -> Any:
    """The model version of ``name`` holding alias ``champion`` (None without one)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_val_scores(version: Any) -> pd.Series | None:
    """Per-image validation scores a version was registered with (its ``val_per_image`` artifact: key and the
    score, a segmenter's Dice or a detector's box F1)."""
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
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register(model_uri: str, name: str, tags: dict[str, Any], score: float, val_scores: pd.Series | None = None,
             scores_uri: str | None = None, run_id: str | None = None, promotion: Promotion | None = None,
             seed: int = 0, global_name: str | None = None, score_key: str = "val_dice") -> dict:
    """Register ``model_uri`` under ``name`` (and under ``global_name``, the cross-method model).

    ``champion`` of each moves to the new version only when :func:`polypflow.evaluate.stats.promotion_decision`
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
