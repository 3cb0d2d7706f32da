"""Fan-out: per-method training and cross-validation folds as parallel Prefect tasks on Dask (prefect-dask).

``dvc.yaml`` stays the owner of what runs. A fan-out task runs the fitting part of the very stage DVC runs
(``python -m stages.train --method M --fit-only``, ``python -m stages.crossval --fold K``): it trains the
stage's persistent checkpoint and nothing else. The pipeline flow then runs ``dvc repro`` as always; each
stage resumes its finished checkpoint, so it only validates, logs to MLflow, registers and writes its
outputs, and DVC records it in dvc.lock. Only the flow runs DVC, so nothing contends for DVC's lock.

GPU concurrency: every fit holds one unit of the Dask worker resource ``GPU``. The local cluster has one
worker per entry of ``fanout.devices``, each with ``GPU=1`` and ``CUDA_VISIBLE_DEVICES`` set to its entry,
so at most one fit runs per GPU. An existing cluster (``fanout.address``) needs workers started alike, with
the project's environment::

    CUDA_VISIBLE_DEVICES=0 dask worker tcp://<scheduler>:8786 --nthreads 1 --resources GPU=1

Its workers either share the project's checkout on a file system (the fits above), or, with ``team.dvc_sync``,
share nothing but the git remote, DVC's remote and the tracking server: a fit is then the whole DVC stage
(``train@M``, ``crossval``), reproduced in a clone of the flow's pushed commit in the worker's temporary folder
(pulling only the data it needs) and pushed with its run-cache entry; the flow's own ``dvc repro --pull``
restores it from that entry instead of refitting, and records it in the flow host's dvc.lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
from distributed import Nanny, Scheduler, SpecCluster, get_worker
from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from flows import sync
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


def remote_fanout(params: Params) -> bool:
    """Fits go to an existing cluster whose workers share no file system, only the team's remotes."""
    return bool(params.fanout.address and params.team.dvc_sync)


def stage_jobs(methods: list[str], crossval: bool) -> dict[str, list[str]]:
    """Each remote fit's name and the DVC stages it reproduces: a method's training, the whole CV."""
    return {f"train@{m}": [f"train@{m}"] for m in methods} | ({"crossval": ["crossval"]} if crossval else {})


@task(name="fit", task_run_name="fit {name}")
def fit(project_dir: str, params_file: str, name: str, args: list[str]) -> dict:
    """Run one stage's fit in ``project_dir`` on this Dask worker's device; raise (and so retry) on failure."""
    started = time.time()
    proc = subprocess.run([sys.executable, *args, "--params", params_file], cwd=project_dir, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({' '.join(args)}) failed with exit code {proc.returncode}:\n{tail}")
    return fit_record(name, started, tail)


def fit_record(name: str, started: float, tail: str, where: str = "", **extra) -> dict:
    """Log a finished fit (``where``: what else to say of it) and return its record: this worker, its device, the
    times, ``extra``."""
    finished, worker = time.time(), get_worker().name
    get_run_logger().info("%s: %.0f s on worker %s%s\n%s", name, finished - started, worker, where, tail)
    return {"name": name, "worker": str(worker), "device": os.environ.get("CUDA_VISIBLE_DEVICES"), **extra,
            "started": started, "finished": finished}


@task(name="fit-in-clone", task_run_name="fit {name} in a clone")
def fit_in_clone(url: str, commit: str, name: str, targets: list[str], worker_cache: str | None = None) -> dict:
    """Reproduce ``targets`` in a fresh clone of ``commit`` on this worker, pulling what they need from DVC's
    default remote into ``worker_cache`` (the host's, shared by its clones), then push their outputs and run-cache
    entries; the clone is removed afterwards."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="polypflow-fit-") as work:
        checkout = sync.clone(url, commit, Path(work) / "checkout")
        sync.share_cache(checkout, worker_cache)
        proc = sync.dvc(checkout, "repro", "--pull", "--allow-missing", *targets)
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        if proc.returncode != 0:
            raise RuntimeError(f"{name} (dvc repro {' '.join(targets)} at {commit[:12]}) failed with exit code "
                               f"{proc.returncode}:\n{tail}")
        pushed = sync.push(checkout, targets)
    return fit_record(name, started, tail, f" at {commit[:12]}; {pushed}", commit=commit, pushed=pushed)


@flow(name="polypflow-fanout")
def fan_out(project_dir: str, params_file: str, jobs: dict[str, list[str]], retries: int = 0,
            retry_delay_s: int = 0, source: tuple[str, str] | None = None,
            worker_cache: str | None = None) -> list[dict]:
    """Submit every fit at once, each holding one ``GPU`` slot; wait for all, then fail naming the failed. With
    ``source`` (git URL, commit) each job is DVC stages reproduced in a worker's own clone (:func:`fit_in_clone`),
    whose DVC cache is ``worker_cache``."""
    options = {"retries": retries, "retry_delay_seconds": retry_delay_s}
    with dask.annotate(resources={GPU: 1}):
        if source:
            fitter = fit_in_clone.with_options(**options)
            futures = {name: fitter.submit(*source, name, targets, worker_cache) for name, targets in jobs.items()}
        else:
            fitter = fit.with_options(**options)
            futures = {name: fitter.submit(project_dir, params_file, name, args) for name, args in jobs.items()}
    wait(list(futures.values()))
    failed = [name for name, future in futures.items() if not future.state.is_completed()]  # failed or crashed
    if failed:
        raise RuntimeError(f"fan-out fits failed: {', '.join(failed)} (see their task logs)")
    return [future.result() for future in futures.values()]


def run_fan_out(project_dir: Path | str, params_file: str, params: Params, jobs: dict[str, list[str]],
                source: tuple[str, str] | None = None) -> list[dict]:
    """:func:`fan_out` on the task runner of ``params.fanout``, with the retries of ``params.schedule``."""
    runner = task_runner(params.fanout)
    return fan_out.with_options(task_runner=runner)(str(project_dir), params_file, jobs, params.schedule.retries,
                                                     params.schedule.retry_delay_s, source, params.team.worker_cache)
