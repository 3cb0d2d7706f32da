"""A real Prefect server, the work pool and cron deployment of flows/deploy.py, one run by a real worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_params, write_params
from services import free_port, service, tail, wait_http

from flows.deploy import ENTRYPOINT

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME; yields the env to reach it."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "INFO"}
    log = tmp_path / "prefect-server.log"
    with service([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env=env) as proc:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, timeout=120)
        yield env


def read_deployment(env: dict[str, str], name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name), client.read_work_pool("gpu-pool")


def trigger(env: dict[str, str], name: str, parameters: dict):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return run_deployment(name, parameters=parameters, timeout=0)


def final_state(env: dict[str, str], flow_run_id, timeout: float = 60.0):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state.is_final() or time.monotonic() > deadline:
                return state
            time.sleep(1)


def test_deployment_runs_on_a_worker(project, prefect_server, tmp_path):
    params = read_params(project)
    params["schedule"].update(retries=0, retry_delay_s=0)  # a failure should show at once, not after retries
    write_params(project, params)
    env = prefect_server

    deployed = subprocess.run([sys.executable, "-m", "flows.deploy", "--project-dir", str(project)], env=env,
                              cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert deployed.returncode == 0, deployed.stdout[-3000:]
    assert "prefect worker start --pool gpu-pool" in deployed.stdout
    deployment, pool = read_deployment(env, "polypflow-pipeline/polypflow-nightly")
    assert pool.type == "process" and pool.concurrency_limit == 1
    assert deployment.work_pool_name == "gpu-pool" and deployment.entrypoint == ENTRYPOINT
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 2 * * *", "UTC")]
    assert deployment.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert deployment.job_variables["working_dir"] == str(project)
    assert deployment.parameters["project_dir"] == str(project)

    flow_run = trigger(env, "polypflow-pipeline/polypflow-nightly", {"crossval": False})
    assert flow_run.state.is_scheduled()
    log = tmp_path / "worker.log"
    worker = [*PREFECT, "worker", "start", "--pool", "gpu-pool", "--run-once", "--limit", "1"]
    with service(worker, log, env=env, cwd=tmp_path) as proc:
        proc.wait(timeout=300)
    state = final_state(env, flow_run.id)
    assert state.is_completed(), f"flow run ended {state.type}: {state.message}\n{tail(log, 60)}"

    from mlflow import MlflowClient  # MLFLOW_TRACKING_URI: the project's SQLite store (project fixture)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("polypflow")
    stages = {r.data.tags.get("polypflow.stage") for r in client.search_runs([experiment.experiment_id])}
    assert {"train", "evaluate", "export", "profile"} <= stages and "crossval" not in stages
    assert int(client.get_model_version_by_alias("unet", "champion").version) == 1
    assert (project / "artifacts" / "eval" / "unet" / "summary.json").exists()
    assert Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).is_relative_to(project)
