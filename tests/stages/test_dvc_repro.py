"""End to end: `dvc repro` runs every stage on synthetic data, registers the model, then is a no-op."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

STAGES = ["ingest", "validate", "split", "train@unet", "crossval", "evaluate@unet", "export@unet", "profile@unet",
          "register@unet", "report"]


def dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_dvc_repro_end_to_end(project):
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-4000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    art = project / "artifacts"
    summary = json.loads((art / "eval" / "unet" / "summary.json").read_text())
    assert set(summary) == {"alpha", "gamma"}  # beta's test part is empty with 4 sequences of 4
    assert summary["gamma"]["n"] == 10 and 0.3 < summary["gamma"]["dice"] <= 1.0
    parity = json.loads((art / "export" / "unet" / "parity.json").read_text())
    assert parity["max_abs_diff"] < 1e-3
    profile = json.loads((art / "profile" / "unet" / "profile.json").read_text())
    assert profile["params"] > 0 and profile["macs_at_image_size"] > 0 and profile["onnxruntime"]["fps"] > 0
    cv = json.loads((art / "crossval" / "unet" / "summary.json").read_text())
    assert cv["k"] == 2 and len(cv["folds"]) == 2
    assert len(list((art / "eval" / "unet" / "gradcam").glob("*.png"))) >= 1
    page = (project / "reports" / "report.html").read_text()
    assert "<table>" in page and "mDice@0.5" in page and "gamma" in page

    from mlflow import MlflowClient

    client = MlflowClient()
    champion = client.get_model_version_by_alias("unet", "champion")
    train_run = client.get_run(champion.run_id)  # the version's source: the run that trained and logged the model
    assert train_run.data.tags["polypflow.stage"] == "train"
    assert float(champion.tags["val_dice"]) == pytest.approx(train_run.data.metrics["best_val_dice"])
    assert not any(k.startswith(("test.", "profile.")) for k in train_run.data.metrics)  # later stages write their own runs
    registered = json.loads((art / "registry" / "unet" / "registered.json").read_text())
    summary_run = client.get_run(registered["run_id"])  # the method's row: its figures side by side
    assert summary_run.info.run_name == "unet" and summary_run.data.tags["polypflow.stage"] == "register"
    assert {"test.gamma.dice", "test.alpha.meanDic", "ort_p50_ms", "val_dice"} <= set(summary_run.data.metrics)
    assert champion.tags["onnx"].endswith("onnx/model.onnx") and champion.tags["test_dice.gamma"]
    assert {i.dataset.name.split(" ")[0] for i in summary_run.inputs.dataset_inputs} >= {
        "70_15_15:training", "70_15_15:validation", "70_15_15:testing.gamma"}
    stages = {r.data.tags.get("polypflow.stage") for r in client.search_runs([train_run.info.experiment_id])}
    assert {"ingest", "validate", "split", "train", "crossval", "evaluate", "export", "profile", "register"} <= stages

    start = time.perf_counter()
    second = dvc(project, "repro")
    took = time.perf_counter() - start
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout[-2000:]
    print(f"no-op dvc repro took {took:.1f} s")
    assert "up to date" in dvc(project, "status").stdout
