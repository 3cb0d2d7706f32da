"""The polypflow pipeline as a Prefect flow over ``dvc repro`` targets.

``dvc.yaml`` stays the one owner of the stage order: each task asks DVC to reproduce a target (DVC runs
whatever upstream stages are stale), so a retried or re-run flow redoes only what changed, and a training
stage killed mid-run resumes from its checkpoint. Retries and their delay come from ``schedule`` in
params.yaml. With ``fanout.enabled``, the training of every stale method and every CV fold first runs in
parallel on Dask, one fit per GPU (:mod:`flows.fanout`); the DVC stages then find their fits done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task

from flows.fanout import fit_jobs, run_fan_out
from polypflow.settings.config import load_params
from polypflow.settings.layout import method_layout
from stages._cli import PERMANENT


def dvc_command() -> list[str]:
    """``dvc`` from the interpreter's own environment (works without an activated venv)."""
    return [sys.executable, "-m", "dvc"]


class PermanentFailure(RuntimeError):
    """A stage refused a setting or an input (its last line says so): the same run would fail the same way."""


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what may pass next time (a lost connection, a killed worker), never a
    :class:`PermanentFailure`."""
    try:
        state.result()
    except PermanentFailure:
        return False
    except Exception:  # noqa: BLE001  anything else may be transient
        return True
    return True


@task(name="dvc-repro", retries=2, retry_delay_seconds=10, retry_condition_fn=transient,
      task_run_name="dvc repro {targets}")
def dvc_repro(project_dir: str, targets: list[str]) -> str:
    """Run ``dvc repro <targets>`` in ``project_dir``; raise when it fails: :class:`PermanentFailure` (not
    retried) when a stage refused a setting or input, ``RuntimeError`` (retried) otherwise."""
    logger = get_run_logger()
    proc = subprocess.run([*dvc_command(), "repro", *targets], cwd=project_dir, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    if proc.returncode != 0:
        error = PermanentFailure if PERMANENT in proc.stdout else RuntimeError
        raise error(f"dvc repro {' '.join(targets)} failed with exit code {proc.returncode}:\n{tail}")
    logger.info("dvc repro %s:\n%s", " ".join(targets), tail)
    return proc.stdout


@task(name="dvc-status", task_run_name="dvc status {targets}")
def dvc_stale(project_dir: str, targets: list[str]) -> list[str]:
    """The stages among (and upstream of) ``targets`` that ``dvc repro`` would run."""
    proc = subprocess.run([*dvc_command(), "status", "--json", *targets], cwd=project_dir, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status {' '.join(targets)} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return sorted(json.loads(proc.stdout or "{}"))


@task(name="collect-results")
def collect_results(project_dir: str, params_file: str, methods: list[str]) -> dict:
    """Read the metrics the stages wrote (evaluation summaries, registry entries, CV summary)."""
    params = load_params(Path(project_dir) / params_file)
    params = params.model_copy(update={"paths": params.paths.model_copy(
        update={"artifacts": Path(project_dir) / params.paths.artifacts})})

    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    files = {m: method_layout(params, m) for m in [*methods, *params.external, params.crossval.method]}
    return {
        "methods": {m: {"test": read(files[m].eval_summary), "registry": read(files[m].registered),
                        "profile": read(files[m].profile)} for m in methods},
        "external": {e: {"test": read(files[e].eval_summary)} for e in params.external},
        "crossval": read(files[params.crossval.method].crossval_summary),
    }


@flow(name="polypflow-pipeline", log_prints=True)
def polypflow_pipeline(project_dir: str = ".", params_file: str = "params.yaml", methods: list[str] | None = None,
                       crossval: bool = True) -> dict:
    """Reproduce the pipeline: data stages, the fan-out of fits, per method train/evaluate/export/profile/register,
    then CV and (for every method) the published maps' evaluation and the report."""
    project_dir = str(Path(project_dir).resolve())
    params = load_params(Path(project_dir) / params_file)
    methods = methods or list(params.train.methods)
    unknown = sorted(set(methods) - set(params.train.methods))
    if unknown:
        raise ValueError(f"methods {unknown} are not in train.methods of {params_file}; dvc.yaml has no stages for them")
    repro = dvc_repro.with_options(retries=params.schedule.retries, retry_delay_seconds=params.schedule.retry_delay_s)
    repro(project_dir, ["split"])
    fits = []
    if params.fanout.enabled:
        stale = dvc_stale(project_dir, [f"train@{m}" for m in methods] + (["crossval"] if crossval else []))
        jobs = fit_jobs(params, [m for m in methods if f"train@{m}" in stale], "crossval" in stale)
        if jobs:
            fits = run_fan_out(project_dir, params_file, params, jobs)
    for method in methods:  # register@ is last of a method's chain: evaluate, export and profile run before it
        repro(project_dir, [f"register@{method}"])
    if crossval:  # the report compares every method and shows the CV: only for a whole run
        repro(project_dir, ["crossval", *(["report"] if set(methods) == set(params.train.methods) else [])])
    return {**collect_results(project_dir, params_file, methods), "fanout": fits}


def require_api(timeout_s: float = 10.0) -> None:
    """With ``PREFECT_API_URL`` set, the API must answer its health check: one line naming the URL otherwise
    (Prefect itself would print three tracebacks). Unset, the flow runs on Prefect's local ephemeral API."""
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return
    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as exc:
        sys.exit(f"Prefect API at {api} (PREFECT_API_URL) cannot be reached: {type(exc).__name__}: {exc}. Start it "
                 "(prefect server start) or unset PREFECT_API_URL to run on a local ephemeral API.")


if __name__ == "__main__":
    require_api()
    print(json.dumps(polypflow_pipeline(), indent=2, default=str))
