"""Deploy the pipeline flow to a Prefect work pool, on the cron schedule of ``schedule`` in params.yaml.

``python -m flows.deploy`` creates (or updates) the ``process`` work pool ``schedule.work_pool`` and a
deployment ``schedule.deployment`` of ``flows/pipeline.py:polypflow_pipeline`` whose code is this project
directory (no remote storage: the worker host reads the same checkout). Each flow run gets the
environment ``schedule.job_env`` (e.g. ``CUDA_VISIBLE_DEVICES``) and runs in the project directory. Then,
on the GPU host, with the venv activated and ``PREFECT_API_URL`` pointing at the server::

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
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

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


def job_variables(schedule: Schedule, project: Path) -> dict[str, Any]:
    """Process-worker job variables: flow runs start in ``project`` with ``schedule.job_env`` set."""
    return {"env": dict(schedule.job_env), "working_dir": str(project)}


def deploy(project_dir: Path | str = ".", params_file: str = "params.yaml", parameters: dict | None = None,
           paused: bool = False) -> UUID:
    """Create the work pool and the cron deployment of the pipeline flow from ``project_dir``; return its id."""
    project = Path(project_dir).resolve()
    schedule = load_params(project / params_file).schedule
    ensure_work_pool(schedule)
    pipeline = flow.from_source(source=str(project), entrypoint=ENTRYPOINT)
    return pipeline.deploy(
        name=schedule.deployment,
        work_pool_name=schedule.work_pool,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"project_dir": str(project), "params_file": params_file, **(parameters or {})},
        job_variables=job_variables(schedule, project),
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
    args = p.parse_args()
    deployment_id = deploy(args.project_dir, args.params, paused=args.paused)
    schedule = load_params(Path(args.project_dir) / args.params).schedule
    print(f"deployment polypflow-pipeline/{schedule.deployment} ({deployment_id}) on work pool "
          f"{schedule.work_pool!r}, cron {schedule.cron!r} {schedule.timezone}\n"
          f"start a worker on the GPU host: prefect worker start --pool {schedule.work_pool}")


if __name__ == "__main__":
    main()
