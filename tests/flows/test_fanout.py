"""Fan-out on Dask: one worker per device, at most one fit per GPU slot, the DVC stages still record it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from distributed import Client
from prefect.testing.utilities import prefect_test_harness

from flows.fanout import GPU, fit_jobs, local_cluster, run_fan_out, task_runner
from flows.pipeline import polypflow_pipeline
from polypflow.settings.config import Fanout, load_params
from tests.conftest import REPO, read_params, write_params


@pytest.mark.quick
def test_local_cluster_pins_one_worker_per_device_with_one_gpu_slot():
    with local_cluster(["0", "1"], threads_per_worker=1) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        env = client.run(lambda: (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["OMP_NUM_THREADS"]))
        workers = client.scheduler_info()["workers"].values()
    assert sorted(env.values()) == [("0", "1"), ("1", "1")]
    assert [w["resources"] for w in workers] == [{GPU: 1}, {GPU: 1}]
    assert all(w["nthreads"] == 1 for w in workers)


@pytest.mark.quick
def test_task_runner_uses_an_existing_cluster_when_given_its_address():
    assert task_runner(Fanout(address="tcp://10.0.0.5:8786")).address == "tcp://10.0.0.5:8786"
    local = task_runner(Fanout(devices=["0", "1", "2"]))
    assert local.address is None and local.cluster_kwargs["devices"] == ["0", "1", "2"]


@pytest.mark.quick
def test_fit_jobs_are_the_stages_fit_commands():
    params = load_params(REPO / "params.yaml")
    jobs = fit_jobs(params, ["unet", "fcn"], folds=True)
    assert jobs["train@unet"] == ["-m", "stages.train", "--method", "unet", "--fit-only"]
    assert [n for n in jobs if n.startswith("crossval")] == [f"crossval fold {k}" for k in range(params.split.folds)]
    assert jobs["crossval fold 0"] == ["-m", "stages.crossval", "--fold", "0"]
    assert list(fit_jobs(params, [], folds=False)) == []


def max_overlap(fits: list[dict]) -> int:
    """The most fits running at the same moment."""
    events = sorted([(f["started"], 1) for f in fits] + [(f["finished"], -1) for f in fits])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def two_gpu_project(project):
    """The test project with a second method, 2 CV folds and a two-device fan-out."""
    params = read_params(project)
    params["methods"]["unet_b"] = {"arch": "unet", "model": params["methods"]["unet"]["model"], "recipe": {"lr": 1e-3}}
    params["train"]["methods"] = ["unet", "unet_b"]
    params["fanout"] = {"enabled": True, "devices": ["0", "1"], "threads_per_worker": 1}
    params["schedule"].update(retries=0, retry_delay_s=0)
    write_params(project, params)
    return project


@pytest.mark.slow
def test_flow_fans_out_fits_and_dvc_records_the_stages(two_gpu_project, prefect_api):
    from mlflow import MlflowClient

    result = polypflow_pipeline(project_dir=str(two_gpu_project), crossval=True)
    fits = result["fanout"]
    assert sorted(f["name"] for f in fits) == ["crossval fold 0", "crossval fold 1", "train@unet", "train@unet_b"]
    assert {f["device"] for f in fits} == {"0", "1"}       # both workers, each on its own device
    assert max_overlap(fits) == 2                          # in parallel, and never more than the 2 GPU slots
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=two_gpu_project, text=True,
                            stdout=subprocess.PIPE, check=True)
    assert json.loads(status.stdout) == {}                 # dvc.lock holds every stage: nothing is stale
    assert (two_gpu_project / "reports" / "report.html").exists()

    client = MlflowClient()
    for method in ("unet", "unet_b"):   # the stage registered once, with the whole curve the fan-out trained
        version = client.get_model_version_by_alias(method, "champion")
        assert int(version.version) == 1
        assert [m.step for m in client.get_metric_history(version.run_id, "val_dice")] == [1, 2]
    folds = client.search_runs([client.get_experiment_by_name("polypflow").experiment_id],
                               "tags.mlflow.runName LIKE 'crossval-unet-fold%'")
    assert len(folds) == 2 and all(len(client.get_metric_history(r.info.run_id, "train_loss")) == 1 for r in folds)
    assert result["crossval"]["k"] == 2

    again = polypflow_pipeline(project_dir=str(two_gpu_project), crossval=True)
    assert again["fanout"] == []                           # nothing stale: no fit submitted
    assert int(client.get_model_version_by_alias("unet", "champion").version) == 1


@pytest.mark.slow
def test_failed_fit_fails_the_fan_out_naming_it(two_gpu_project, prefect_api):
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "split"], cwd=two_gpu_project, check=True)
    params = load_params(two_gpu_project / "params.yaml")
    jobs = {"train@unet": fit_jobs(params, ["unet"], folds=False)["train@unet"],
            "train@nope": ["-m", "stages.train", "--method", "nope", "--fit-only"]}
    with pytest.raises(RuntimeError, match=r"fan-out fits failed: train@nope \("):
        run_fan_out(two_gpu_project, "params.yaml", params, jobs)
    assert (two_gpu_project / "artifacts" / "checkpoints" / "unet" / "checkpoint.pt").exists()  # the others ran
    assert not (two_gpu_project / "artifacts" / "models" / "unet").exists()  # a fit writes its checkpoint only:
    from mlflow import MlflowClient                                             # no outputs, no MLflow run

    experiment = MlflowClient().get_experiment_by_name("polypflow")
    assert not MlflowClient().search_runs([experiment.experiment_id], "tags.`polypflow.stage` = 'train'")


@pytest.mark.slow
def test_existing_cluster_runs_one_fit_per_gpu_slot_even_with_spare_threads(two_gpu_project, prefect_api):
    from distributed import LocalCluster

    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "split"], cwd=two_gpu_project, check=True)
    with LocalCluster(n_workers=1, threads_per_worker=2, resources={GPU: 1}, host="127.0.0.1",
                      dashboard_address=None, memory_limit=0) as cluster:
        params = load_params(two_gpu_project / "params.yaml").model_copy(
            update={"fanout": Fanout(address=cluster.scheduler_address)})
        fits = run_fan_out(two_gpu_project, "params.yaml", params, fit_jobs(params, ["unet", "unet_b"], folds=False))
    assert sorted(f["name"] for f in fits) == ["train@unet", "train@unet_b"]
    assert max_overlap(fits) == 1     # two threads free, one GPU slot: the fits wait for each other
