"""The one registry of methods: snake_case name -> builder, each entry tagged with its task.

Output contract shared by every segmentation method: ``forward(x)`` returns a tuple of logit maps at the
input's spatial size, the main prediction first and any deep-supervision maps after. One trainer, one
loss module and one exporter serve every method through this contract. Detection methods
(``task="detection"``) return raw per-level head outputs instead and decode them to boxes themselves
(see :mod:`models.gfl_atss`); what a task means is ``polypflow.tasks``' (its ``task_of``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from models.tta import Tta, with_tta

Builder = Callable[..., nn.Module]
Task = str  # what a method predicts: "segmentation" (the default), "detection"; polypflow.tasks knows each


@dataclass(frozen=True)
class MethodEntry:
    name: str
    builder: Builder
    paper: str
    # kwargs that make a tiny, fast variant for the parametrised tests (64x64 inputs)
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    task: Task = "segmentation"


_METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str, *, paper: str, test_kwargs: dict[str, Any] | None = None, task: Task = "segmentation"
) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; a second registration of the same name is an error."""
    def decorate(builder: Builder) -> Builder:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodEntry(name, builder, paper, dict(test_kwargs or {}), task)
        return builder

    return decorate


def method_entry(name: str) -> MethodEntry:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}") from None


def refuse_tta(entry: MethodEntry, where: str = "") -> None:
    """Flip test-time augmentation averages segmentation maps: a ``ValueError`` for a method of another task."""
    if entry.task != "segmentation":
        raise ValueError(f"{where + ': ' if where else ''}tta (flip test-time augmentation) is for segmenters; "
                         f"{entry.name!r} is a {entry.task} method")


def check_kwargs(name: str, kwargs: dict[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` naming ``where`` when ``kwargs`` are not arguments of builder ``name`` (a typo caught
    before anything is built or trained, instead of a ``TypeError`` deep inside a stage)."""
    entry = method_entry(name)
    signature = inspect.signature(entry.builder)
    if "tta" in kwargs:
        refuse_tta(entry, where or name)
    unknown = sorted(set(kwargs) - set(signature.parameters) - {"tta"})
    if unknown:
        raise ValueError(f"{where or name}: unknown argument(s) {unknown} of builder {name!r}; "
                         f"it takes {list(signature.parameters)}")


def build_model(name: str, tta: Tta = "none", **kwargs: Any) -> nn.Module:
    """Build method ``name`` with the keyword arguments from ``methods.<name>.model``; ``tta`` (every segmenter's
    argument) wraps it in flip test-time augmentation (:mod:`models.tta`)."""
    entry = method_entry(name)
    if tta != "none":
        refuse_tta(entry)
    return with_tta(entry.builder(**kwargs), tta)


def method_task(name: str) -> Task:
    """``"segmentation"`` or ``"detection"``: what method ``name`` predicts."""
    return method_entry(name).task


def list_methods(task: Task | None = None) -> list[str]:
    """Registered method names, all of them or those of one ``task``."""
    return sorted(name for name, entry in _METHODS.items() if task is None or entry.task == task)
