"""The MLflow UI's shared view of the methods' rows: stored on the experiment, opened by a link to the runs table."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from polypflow.track import view as mlflow_view


@pytest.mark.quick
def test_the_view_lists_the_methods_rows_with_each_test_sets_figures():
    state = mlflow_view.view_state(["kvasir", "colondb"])
    assert state["searchFilter"] == "tags.`polypflow.stage` = 'register'"
    columns = state["selectedColumns"]
    for dataset in ("kvasir", "colondb"):
        for metric in ("dice", "meanDic", "box_ap50"):
            assert f"metrics.`test.{dataset}.{metric}`" in columns
    assert "attributes.`Dataset`" in columns and "metrics.`ort_p50_ms`" in columns


@pytest.mark.quick
def test_the_link_opens_the_runs_table_in_model_training_mode_with_the_view():
    """MLflow 3.17's UI lands on its GenAI overview and drops the share key unless the link names the runs page and
    ``workflowType=machine_learning`` (seen in headless Chromium)."""
    url = urlsplit(mlflow_view.link("http://127.0.0.1:5000/", "7", "abc123"))
    route = urlsplit(url.fragment)
    assert route.path == "/experiments/7/runs"
    assert parse_qs(route.query) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["abc123"]}


def test_sharing_is_idempotent_and_stores_the_view_on_the_experiment(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from conftest import REPO
    from polypflow.settings.config import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    first, again = mlflow_view.share(params, ["kvasir"]), mlflow_view.share(params, ["kvasir"])
    assert first == again
    tags = MlflowClient().get_experiment(first[0]).tags
    assert json.loads(tags[mlflow_view.STATE_TAG + first[1]]) == mlflow_view.view_state(["kvasir"])
