"""Fan-out: per-method training and cross-validation folds as parallel Prefect tasks on Dask (prefect-dask).

``dvc.yaml`` stays the owner of what runs. A fan-out task runs the fitting part of the very stage DVC runs
(``python -m stages.train --method M --fit-only``, ``python -m stages.crossval --fold K``): it trains the
stage's persistent checkpoint and nothing else. The pipeline flow then runs ``dvc repro`` as always; each
stage resumes its finished checkpoint, so it only validates, logs to MLflow, registers and writes its
outputs, and DVC records it in dvc.lock. Only the flow runs DVC, so nothing contends for DVC's lock.

GPU concurrency: every fit holds one unit of the Dask worker resource ``GPU``. The local cluster has one
worker per entry of ``fanout.devices``, each with ``GPU=1`` and ``CUDA_VISIBLE_DEVICES`` set to its entry,
so at most one fit runs per GPU. An existing cluster (``fanout.address``) needs workers started alike, each
in a checkout of this project on a shared file system, with the project's environment::

    CUDA_VISIBLE_DEVICES=0 dask worker tcp://<scheduler>:8786 --nthreads 1 --resources GPU=1
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dask
from distributed import Nanny, Scheduler, SpecCluster, get_worker
from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from polypflow.settings.config import Fanout, Params

GPU = "GPU"  # the Dask worker resource a fit holds


def local_cluster(devices: list[str], threads_per_worker: int | None = None) -> SpecCluster:
    """A Dask cluster on this host: a worker per device, pinned to it, with one ``GPU`` slot and one thread."""
    threads = str(threads_per_worker or max(1, (os.cpu_count() or 1) // len(devices)))
    workers = {
        f"gpu{device}": {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {GPU: 1}, "memory_limit": 0,  # the fit runs in a child process
            "env": {"CUDA_VISIBLE_DEVICES": device, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}}
        for device in devices
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="polypflow-fanout")


def task_runner(fanout: Fanout) -> DaskTaskRunner:
    """The runner of ``fanout``: the cluster at ``fanout.address``, else :func:`local_cluster`."""
    if fanout.address:
        return DaskTaskRunner(address=fanout.address)
    return DaskTaskRunner(cluster_class=local_cluster,
                          cluster_kwargs={"devices": list(fanout.devices), "threads_per_worker": fanout.threads_per_worker})


def fit_jobs(params: Params, methods: list[str], folds: bool) -> dict[str, list[str]]:
    """Each fit's name and stage command line (after ``python``): methods' training, then every CV fold."""
    jobs = {f"train@{m}": ["-m", "stages.train", "--method", m, "--fit-only"] for m in methods}
    if folds:
        jobs |= {f"crossval fold {k}": ["-m", "stages.crossval", "--fold", str(k)] for k in range(params.split.folds)}
    return jobs


@task(name="fit", task_run_name="fit {name}")
def fit(project_dir: str, params_file: str, name: str, args: list[str]) -> dict:
    """Run one stage's fit in ``project_dir`` on this Dask worker's device; raise (and so retry) on failure."""
    started = time.time()
    proc = subprocess.run([sys.executable, *args, "--params", params_file], cwd=project_dir, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({' '.join(args)}) failed with exit code {proc.returncode}:\n{tail}")
    finished = time.time()
    get_run_logger().info("%s: %.0f s on worker %s\n%s", name, finished - started, get_worker().name, tail)
    return {"name": name, "worker": str(get_worker().name), "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started": started, "finished": finished}


@flow(name="polypflow-fanout")
def fan_out(project_dir: str, params_file: str, jobs: dict[str, list[str]], retries: int = 0,
            retry_delay_s: int = 0) -> list[dict]:
    """Submit every fit at once, each holding one ``GPU`` slot; wait for all, then fail naming the failed."""
    fitter = fit.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    with dask.annotate(resources={GPU: 1}):
        futures = {name: fitter.submit(project_dir, params_file, name, args) for name, args in jobs.items()}
    wait(list(futures.values()))
    failed = [name for name, future in futures.items() if not future.state.is_completed()]  # failed or crashed
    if failed:
        raise RuntimeError(f"fan-out fits failed: {', '.join(failed)} (see their task logs)")
    return [future.result() for future in futures.values()]


def run_fan_out(project_dir: Path | str, params_file: str, params: Params, jobs: dict[str, list[str]]) -> list[dict]:
    """:func:`fan_out` on the task runner of ``params.fanout``, with the retries of ``params.schedule``."""
    runner = task_runner(params.fanout)
    return fan_out.with_options(task_runner=runner)(str(project_dir), params_file, jobs,
                                                     params.schedule.retries, params.schedule.retry_delay_s)
