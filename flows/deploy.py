"""Deploy the pipeline flow to a Prefect work pool, on the cron schedule of ``schedule`` in params.yaml.

``python -m flows.deploy`` creates (or updates) the ``process`` work pool ``schedule.work_pool`` and a
deployment ``schedule.deployment`` of ``flows/pipeline.py:polypflow_pipeline``. Its code is either this project
directory (the one-machine default: the worker host reads the same checkout), or, with ``--from-git``, the
current branch of a git remote (``team.git_remote``): each flow run clones it on the worker's host, which shares
nothing else with this one but DVC's remote and the tracking server (``team.dvc_sync`` then pulls the data the
stages to run need and pushes every result). Each flow run gets the environment ``schedule.job_env`` (e.g.
``CUDA_VISIBLE_DEVICES``). Then, on the GPU host, with the venv activated and ``PREFECT_API_URL`` pointing at the
server::

    prefect worker start --pool gpu-pool
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.runner.storage import GitRepository
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from flows.sync import git, published_commit
from polypflow.settings.config import Schedule, load_params

ENTRYPOINT = "flows/pipeline.py:polypflow_pipeline"


def ensure_work_pool(schedule: Schedule) -> str:
    """Create the ``process`` work pool named in ``schedule`` (updating an existing one); return its name."""
    pool = WorkPoolCreate(name=schedule.work_pool, type=ProcessWorker.type,
                          base_job_template=ProcessWorker.get_default_base_job_template(),
                          concurrency_limit=schedule.pool_concurrency,
                          description="polypflow: one process per flow run on the GPU host")
    with get_client(sync_client=True) as client:
        client.create_work_pool(pool, overwrite=True)
    return schedule.work_pool


def job_variables(schedule: Schedule, project: Path | None) -> dict[str, Any]:
    """Process-worker job variables: ``schedule.job_env``; flow runs start in ``project`` unless it is None (a git
    source: the flow run's own clone)."""
    return {"env": dict(schedule.job_env)} | ({"working_dir": str(project)} if project else {})


def git_source(project: Path, git_remote: str) -> GitRepository:
    """The current branch of ``git_remote``, which must hold this checkout's commit (a worker clones that)."""
    url, commit = published_commit(project, git_remote)
    branch = git(project, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":
        raise ValueError(f"{project}: a detached HEAD ({commit[:12]}); check out the branch the deployment follows")
    return GitRepository(url=url, branch=branch)


def deploy(project_dir: Path | str = ".", params_file: str = "params.yaml", parameters: dict | None = None,
           paused: bool = False, from_git: bool = False) -> UUID:
    """Create the work pool and the cron deployment of the pipeline flow from ``project_dir`` (or, ``from_git``,
    from its branch on ``team.git_remote``); return its id."""
    project = Path(project_dir).resolve()
    params = load_params(project / params_file)
    schedule = params.schedule
    ensure_work_pool(schedule)
    source = git_source(project, params.team.git_remote) if from_git else str(project)
    pipeline = flow.from_source(source=source, entrypoint=ENTRYPOINT)
    return pipeline.deploy(
        name=schedule.deployment,
        work_pool_name=schedule.work_pool,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"project_dir": "." if from_git else str(project), "params_file": params_file,
                    **({"worker_clone": True} if from_git else {}), **(parameters or {})},
        job_variables=job_variables(schedule, None if from_git else project),
        paused=paused,
        tags=["polypflow"],
        build=False,
        push=False,
        print_next_steps=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--paused", action="store_true", help="create the deployment with its schedule paused")
    p.add_argument("--from-git", action="store_true",
                   help="code from the current branch of team.git_remote (pushed), cloned by each flow run")
    args = p.parse_args()
    deployment_id = deploy(args.project_dir, args.params, paused=args.paused, from_git=args.from_git)
    schedule = load_params(Path(args.project_dir) / args.params).schedule
    print(f"deployment polypflow-pipeline/{schedule.deployment} ({deployment_id}) on work pool "
          f"{schedule.work_pool!r}, cron {schedule.cron!r} {schedule.timezone}\n"
          f"start a worker on the GPU host: prefect worker start --pool {schedule.work_pool}")


if __name__ == "__main__":
    main()
