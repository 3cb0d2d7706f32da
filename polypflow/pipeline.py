"""Where each stage's outputs live (one place, used by stages; dvc.yaml templates the same layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from polypflow.config import Params


def model_dir(params: Params, method: str) -> Path:
    return params.paths.artifacts / "models" / method


def checkpoint_dir(params: Params, method: str) -> Path:
    return params.paths.artifacts / "checkpoints" / method


def stage_dir(params: Params, stage: str, method: str) -> Path:
    return params.paths.artifacts / stage / method


def read_facts(params: Params) -> pd.DataFrame:
    return pd.read_csv(params.paths.facts, keep_default_na=False, dtype={"id": str})


def image_keys(facts: pd.DataFrame) -> pd.Series:
    """Each row's ``dataset/id``: the name splits.json, the image cache and the reports use for an image."""
    return facts["dataset"] + "/" + facts["id"].astype(str)


def by_image_key(facts: pd.DataFrame) -> pd.DataFrame:
    """``facts`` indexed by :func:`image_keys`."""
    return facts.set_index(image_keys(facts).rename("key"))


def read_splits(params: Params) -> dict:
    with open(params.paths.splits) as f:
        return json.load(f)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def method_arch(params: Params, method: str) -> tuple[str, dict]:
    """Registered architecture name and builder kwargs of configured method ``method``."""
    if method not in params.methods:
        raise KeyError(f"unknown method {method!r}; params.yaml methods: {sorted(params.methods)}")
    spec = params.methods[method]
    return spec.arch or method, dict(spec.model)
