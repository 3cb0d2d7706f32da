"""Serve the pipeline flow on the cron schedule of ``schedule`` in params.yaml.

``python -m flows.serve`` registers a deployment named ``schedule.deployment`` and runs its scheduled
flow runs in this process (Prefect's ``serve``); stop it with Ctrl-C. It needs a Prefect API: a server
started with ``prefect server start`` and ``PREFECT_API_URL`` pointing at it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron

from flows.pipeline import polypflow_pipeline
from polypflow.settings.config import load_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--project-dir", default=".")
    args = p.parse_args()
    project = Path(args.project_dir).resolve()
    schedule = load_params(project / args.params).schedule
    polypflow_pipeline.serve(
        name=schedule.deployment,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"project_dir": str(project), "params_file": args.params},
        tags=["polypflow"],
    )


if __name__ == "__main__":
    main()
