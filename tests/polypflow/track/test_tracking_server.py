"""Shared tracking: an MLflow server on a throwaway PostgreSQL cluster; `dvc repro train@unet` logs to it.

The cluster (initdb, then ``postgres`` in the foreground) runs as the ``postgres`` user when the tests run
as root; the MLflow server proxies artifacts to a local folder (``--artifacts-destination``, where a team
uses ``s3://...``). Skipped with the reason when the PostgreSQL server binaries are not installed
(CI installs them: ``.ci/run``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from services import free_port, postgres_cluster, service, wait_http

pytestmark = pytest.mark.slow

@pytest.fixture
def postgres(tmp_path):
    with postgres_cluster(tmp_path) as uri:
        yield uri


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    port, log = free_port(), tmp_path / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with service(cmd, log) as proc:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        yield f"http://127.0.0.1:{port}"


def test_training_logs_and_registers_on_the_shared_server(project, mlflow_server, postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro", "register@unet"], cwd=project, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert repro.returncode == 0, repro.stdout[-4000:]
    assert not (project / "mlflow").exists()  # nothing went to the local SQLite default

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    champion = client.get_model_version_by_alias("unet", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["polypflow.stage"] == "train" and run.info.status == "FINISHED"
    assert run.data.metrics["best_val_dice"] == pytest.approx(float(champion.tags["val_dice"]))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"history.csv"}
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    model = Path(mlflow.artifacts.download_artifacts("models:/unet@champion", dst_path=str(tmp_path / "download")))
    assert (model / "MLmodel").exists() and (model / "artifacts" / "model.pt").exists()  # polypflow.deploy.serving
    assert list((tmp_path / "artifacts").rglob("MLmodel"))  # proxied into --artifacts-destination

    import psycopg2  # the rows are in PostgreSQL, not in a file store

    with psycopg2.connect(postgres) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM registered_model_aliases WHERE name = 'unet' AND alias = 'champion'")
        assert cur.fetchone()[0] == 1
