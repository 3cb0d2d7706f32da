"""register@<method>: the one place that registers; its run is the method's row; same weights never twice."""

from __future__ import annotations

import json

import pytest

from conftest import split_workdir
from polypflow.settings.layout import method_layout
from stages import evaluate, export, profile, register, train


@pytest.fixture
def trained(tmp_path, synthetic_root, monkeypatch):
    params = split_workdir(tmp_path, synthetic_root, monkeypatch)
    train.run(params, "unet")
    for stage in (evaluate, export, profile):
        stage.run(params, "unet")
    return params


def test_register_logs_the_methods_row_and_registers_once(trained):
    from mlflow import MlflowClient

    params, client = trained, MlflowClient()
    files = method_layout(params, "unet")
    train_run = json.loads(files.run_record("train").read_text())["run_id"]
    assert client.search_registered_models() == []  # train, evaluate, export, profile register nothing

    first = register.run(params, "unet")
    assert first["version"] == 1 and first["champion"] is True and first["global"]["version"] == 1
    version = client.get_model_version("unet", "1")
    assert version.run_id == train_run  # the model the training run logged
    assert version.tags["onnx"] == f"runs:/{json.loads(files.run_record('export').read_text())['run_id']}/onnx/model.onnx"
    assert set(version.tags) >= {"test_dice.gamma", "test_meandic.alpha", "weights_sha256", "threshold", "image_size"}
    row = client.get_run(first["run_id"])
    assert row.info.run_name == "unet" and row.data.tags["polypflow.run.train"] == train_run
    assert row.data.metrics["test.gamma.dice"] == pytest.approx(
        json.loads(files.eval_summary.read_text())["gamma"]["dice_at_method_threshold"])
    contexts = {t.value for i in row.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert {"training", "validation", "testing.gamma"} <= contexts
    assert not any(k.startswith("test.") for k in client.get_run(train_run).data.metrics)  # nothing written back

    again = register.run(params, "unet")  # a re-run (say, DVC lost its lock) with the same weights
    assert again["version"] == 1 and again["reused"] is True
    assert [int(v.version) for v in client.search_model_versions("name = 'unet'")] == [1]
    assert json.loads(files.registered.read_text())["version"] == 1
