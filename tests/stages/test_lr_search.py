"""Optuna learning-rate search on synthetic data: trials run, the median pruner prunes, best is recorded."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import synthetic_params, write_params
from polypflow.settings.config import load_params
from stages import ingest, lr_search, split, validate


@pytest.fixture
def tuned_project(project, synthetic_root):
    params = synthetic_params(synthetic_root)
    params["lr_search"] = {"methods": ["unet"], "trials": 4, "lr_low": 1e-5, "lr_high": 1e-1,
                           "startup_trials": 1, "recipe": {"epochs": 2}}
    write_params(project, params)
    p = load_params("params.yaml")
    for stage in (ingest, validate, split):
        stage.run(p)
    return p


def test_lr_search_records_trials_and_best(tuned_project):
    best = lr_search.run(tuned_project, "unet")
    out = tuned_project.paths.artifacts / "lr_search" / "unet"
    assert json.loads((out / "best.json").read_text()) == best
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and best["trials"] == 4
    assert 1e-5 <= best["lr"] <= 1e-1
    completed = trials[trials["state"] == "COMPLETE"]
    assert best["val_dice"] == pytest.approx(completed["value"].max())

    import mlflow

    runs = mlflow.search_runs(filter_string="tags.`polypflow.stage` = 'lr_search'", search_all_experiments=True,
                              output_format="list")
    assert len(runs) == 5  # the study and one nested run per trial


def test_unknown_method_in_lr_search_is_rejected(project, synthetic_root):
    params = synthetic_params(synthetic_root)
    params["lr_search"] = {"methods": ["nope"]}
    write_params(project, params)
    with pytest.raises(Exception, match="nope"):
        load_params("params.yaml")
