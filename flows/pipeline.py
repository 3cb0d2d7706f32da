"""The polypflow pipeline as a Prefect flow over ``dvc repro`` targets.

``dvc.yaml`` stays the one owner of the stage order: each task asks DVC to reproduce a target (DVC runs
whatever upstream stages are stale), so a retried or re-run flow redoes only what changed, and a training
stage killed mid-run resumes from its checkpoint. Retries and their delay come from ``schedule`` in
params.yaml. With ``fanout.enabled``, the training of every stale method and every CV fold first runs in
parallel on Dask, one fit per GPU (:mod:`flows.fanout`); the DVC stages then find their fits done.
With ``team.dvc_sync`` (infra.yaml) it pulls what the stages to run need from DVC's default remote and ends by
pushing every output and the run-cache there (:mod:`flows.sync`), so another host restores the results instead
of recomputing them; a fan-out to an existing cluster then fits in each worker's own clone of the pushed commit.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task

from flows import sync
from flows.fanout import fit_jobs, remote_fanout, run_fan_out, stage_jobs
from polypflow.settings.config import load_params
from polypflow.settings.layout import method_layout
from stages._cli import PERMANENT


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
def dvc_repro(project_dir: str, targets: list[str], options: tuple[str, ...] = ()) -> str:
    """Run ``dvc repro [options] <targets>`` in ``project_dir``; raise when it fails: :class:`PermanentFailure`
    (not retried) when a stage refused a setting or input, ``RuntimeError`` (retried) otherwise.

    DVC removes a stage's outputs before it runs it; every output is cached and a failed stage's dvc.lock entry
    still names its last outputs, so a failure first puts those back (``dvc checkout``): an input only the stage
    can judge (a test list naming an image the data lacks, a tracking store gone bad) costs no finished work."""
    logger = get_run_logger()
    proc = sync.dvc(project_dir, "repro", *options, *targets)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    if proc.returncode != 0:
        error = PermanentFailure if PERMANENT in proc.stdout else RuntimeError
        restored = sync.dvc(project_dir, "checkout", "--with-deps", *targets).returncode == 0
        raise error(f"dvc repro {' '.join(targets)} failed with exit code {proc.returncode}"
                    f"{' (the last outputs put back: dvc checkout)' if restored else ''}:\n{tail}")
    logger.info("dvc repro %s:\n%s", " ".join(targets), tail)
    return proc.stdout


@task(name="dvc-status", task_run_name="dvc status {targets}")
def dvc_stale(project_dir: str, targets: list[str], options: tuple[str, ...] = ()) -> list[str]:
    """The stages among (and upstream of) ``targets`` that ``dvc repro [options]`` would run. With
    ``--allow-missing`` only its dry run tells (data merely absent here is not staleness there)."""
    if "--allow-missing" in options:
        proc = sync.dvc(project_dir, "repro", "--dry", "--allow-missing", *targets)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro --dry {' '.join(targets)} failed with exit code {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}")
        return sorted(set(re.findall(r"Running stage '([^']+)'", proc.stdout)))  # (its "is cached" is unreliable)
    proc = sync.dvc(project_dir, "status", "--json", *targets, merged=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status {' '.join(targets)} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return sorted(json.loads(proc.stdout or "{}"))


@task(name="dvc-push", task_run_name="dvc push --run-cache {targets}")
def dvc_push(project_dir: str, targets: list[str]) -> str:
    """Push ``targets``' outputs (all if empty) and the run-cache to DVC's default remote; retried (a push resumes:
    what arrived is not sent again), then the flow run fails naming what did not arrive."""
    summary = sync.push(project_dir, targets)
    get_run_logger().info("dvc push --run-cache %s: %s", " ".join(targets), summary)
    return summary


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
                       crossval: bool = True, worker_clone: bool = False) -> dict:
    """Reproduce the pipeline: data stages, the fan-out of fits, per method train/evaluate/export/profile/register,
    then CV and (for every method) the published maps' evaluation and the report. ``worker_clone``: the project is
    the clone a git-sourced deployment made for this flow run, which takes the host's ``team.worker_cache``."""
    project_dir = str(Path(project_dir).resolve())
    params = load_params(Path(project_dir) / params_file)
    if worker_clone:
        sync.share_cache(project_dir, params.team.worker_cache)
    methods = methods or list(params.train.methods)
    unknown = sorted(set(methods) - set(params.train.methods))
    if unknown:
        raise ValueError(f"methods {unknown} are not in train.methods of {params_file}; dvc.yaml has no stages for them")
    retry = {"retries": params.schedule.retries, "retry_delay_seconds": params.schedule.retry_delay_s}
    repro, push = dvc_repro.with_options(**retry), dvc_push.with_options(**retry)
    options = tuple(sync.repro_options(params.team))
    repro(project_dir, ["split"], options)
    fits = []
    if params.fanout.enabled:
        stale = dvc_stale(project_dir, [f"train@{m}" for m in methods] + (["crossval"] if crossval else []), options)
        stale_methods = [m for m in methods if f"train@{m}" in stale]
        if remote_fanout(params):  # each fit in its worker's own clone, its result back through the remote
            if jobs := stage_jobs(stale_methods, "crossval" in stale):
                source = sync.published_commit(project_dir, params.team.git_remote)
                push(project_dir, ["split"])  # the data the workers' fits pull
                fits = run_fan_out(project_dir, params_file, params, jobs, source)
        elif jobs := fit_jobs(params, stale_methods, "crossval" in stale):
            fits = run_fan_out(project_dir, params_file, params, jobs)
    for method in methods:  # register@ is last of a method's chain: evaluate, export and profile run before it
        repro(project_dir, [f"register@{method}"], options)
    if crossval:  # the report compares every method and shows the CV: only for a whole run
        repro(project_dir, ["crossval", *(["report"] if set(methods) == set(params.train.methods) else [])], options)
    pushed = push(project_dir, []) if params.team.dvc_sync else None
    return {**collect_results(project_dir, params_file, methods), "fanout": fits, "pushed": pushed}


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
