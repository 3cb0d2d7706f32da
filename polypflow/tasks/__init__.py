"""Tasks: what a model predicts, as one contract (:class:`~polypflow.tasks.base.Task`). A new task is one module
here (and its model in ``models/``), added to :data:`TASKS`."""

from __future__ import annotations

from models import method_task
from polypflow.tasks.base import Task
from polypflow.tasks.detection import DetectionTask
from polypflow.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (SegmentationTask, DetectionTask)}


def task_of(arch: str) -> type[Task]:
    """The task of registered architecture ``arch`` (what ``models.method_task`` declares for it)."""
    name = method_task(arch)
    if name not in TASKS:
        raise KeyError(f"architecture {arch!r} declares task {name!r}, which polypflow.tasks does not have "
                       f"(tasks: {', '.join(sorted(TASKS))})")
    return TASKS[name]


__all__ = ["TASKS", "DetectionTask", "SegmentationTask", "Task", "task_of"]
