"""A configured method resolved once into a :class:`MethodPlan` (architecture, builder kwargs, recipe, images,
task) that train, crossval and lr_search all fit through :func:`fit_plan`; the training images its int8 graph is
calibrated on (:func:`calibration_batches`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from models import build_model, check_kwargs
from models.tta import plain
from polypflow.data.images import load_image_set, read_facts, read_splits
from polypflow.data.splits import read_test_lists
from polypflow.infer.device import resolve_device
from polypflow.settings.config import Params, ParamsError, Recipe
from polypflow.tasks import Task, task_of
from polypflow.train.checkpoint import set_aside_foreign
from polypflow.train.engine import EpochCallback, FitResult, fit, seed_everything


def subsample(keys: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded subset of at most ``limit`` keys (all of them when ``limit`` is None)."""
    if limit is None or len(keys) <= limit:
        return list(keys)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(keys, size=limit, replace=False).tolist())


@dataclass(frozen=True)
class MethodPlan:
    """A configured method resolved once: what to build, how to train it, on which images, as which task."""

    method: str
    arch: str
    kwargs: dict
    recipe: Recipe
    train_keys: list[str]
    val_keys: list[str]
    seed: int
    task: Task

    @property
    def fingerprint(self) -> str:
        """Identifies the settings a checkpoint was trained with (resume only a checkpoint of the same plan)."""
        parts = (self.arch, self.kwargs, self.recipe.model_dump(), self.train_keys, self.val_keys, self.seed)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_method(params: Params, method: str, train_keys: list[str], val_keys: list[str],
                recipe: Recipe | None = None, seed_offset: int = 0) -> MethodPlan:
    """``method`` of params with its recipe (or ``recipe``), its training images subsampled to the recipe's
    ``max_train_items`` (seeded with ``seed + seed_offset``). A builder argument or a loss the task cannot train
    is an error naming the method, before anything is built or changed on disk."""
    arch, kwargs = params.method_arch(method)
    recipe = recipe or params.recipe(method)
    task = method_task(params, method, recipe)
    return MethodPlan(method, arch, kwargs, recipe, subsample(train_keys, recipe.max_train_items, params.seed + seed_offset),
                      list(val_keys), params.seed, task)


def calibration_batches(params: Params, method: str, size: int) -> Iterator[np.ndarray]:
    """``export.int8_calibration_images`` of the images ``method`` trained on (a seeded subset of its plan's
    training keys), at ``size`` px, as the exported graph takes them: one float32 1×3×S×S RGB batch in [0, 1] each.
    Loaded on the first ``next`` (a task that does not quantise loads nothing)."""
    splits = read_splits(params)
    keys = plan_method(params, method, splits["train"], splits["val"]).train_keys
    chosen = subsample(keys, params.export.int8_calibration_images, params.seed)
    data = load_image_set(read_facts(params), chosen, size, params.validate_.mask_threshold, params.paths.cache)
    for image in data.images:
        yield image.transpose(2, 0, 1)[None].astype(np.float32) / 255


def method_task(params: Params, method: str, recipe: Recipe) -> Task:
    """``method``'s task with ``recipe``, its builder arguments and loss checked: an error naming the method and the
    key, before anything is built or changed on disk."""
    arch, kwargs = params.method_arch(method)
    check_kwargs(arch, kwargs, f"methods.{method}.model")
    try:
        task = task_of(arch)(params, recipe)
        task.check()
    except ValueError as exc:
        raise ValueError(f"methods.{method}.{exc}" if str(exc).startswith("recipe.") else f"methods.{method}: {exc}") from None
    return task


def check_settings(params: Params) -> list[str]:
    """What no stage may find wrong only after DVC removed its outputs: every method a stage trains (its builder
    arguments, recipe and loss: train.methods, crossval.method with crossval.recipe, lr_search.methods), the
    device, and the protocol's test lists. Returns the methods checked."""
    resolve_device(params.device)
    if params.split.scheme == "pranet":
        if not Path(params.split.test_lists).is_dir():
            raise ParamsError(f"split.test_lists: {params.split.test_lists}: no such folder (scheme pranet reads "
                              "<dataset>_test.txt there)")
        read_test_lists(params.split)  # each readable, no id twice
    planned = [(m, params.recipe(m)) for m in params.train.methods]
    planned.append((params.crossval.method, params.recipe(params.crossval.method, params.crossval.recipe)))
    planned += [(m, params.recipe(m, params.lr_search.recipe)) for m in params.lr_search.methods]
    for method, recipe in planned:
        method_task(params, method, recipe)
    for method in params.train.methods:
        check_float_modules(params, method)
    return sorted({method for method, _ in planned})


def check_float_modules(params: Params, method: str) -> None:
    """``methods.<method>.int8_float_modules`` name modules with parameters in ``method``'s network (its plain
    network, without a test-time-augmentation wrapper): an error naming the key, before anything is trained (the
    network is built only for a method that names some)."""
    modules = params.methods[method].int8_float_modules
    if not modules:
        return
    arch, kwargs = params.method_arch(method)
    network = dict(plain(build_model(arch, **kwargs)).named_modules())
    wrong = [m for m in modules if m not in network or next(network[m].parameters(), None) is None]
    if wrong:
        top = ", ".join(name for name in network if name and "." not in name)
        raise ParamsError(f"methods.{method}.int8_float_modules: {wrong} name no module with parameters in its "
                          f"network (module paths such as encoder.blocks.0; its top-level modules: {top})")


def build_plan_model(plan: MethodPlan) -> nn.Module:
    """The plan's model, seeded."""
    seed_everything(plan.seed)
    return build_model(plan.arch, **plan.kwargs)


def fit_plan(params: Params, plan: MethodPlan, checkpoint: Path, resume: bool,
             on_epoch: EpochCallback | None = None) -> tuple[nn.Module, FitResult]:
    """Build the plan's model, load its images and fit it to ``checkpoint``: the one core of train, crossval and
    lr_search."""
    model = build_plan_model(plan)
    aside = set_aside_foreign(checkpoint, plan.fingerprint) if resume else []
    load = lambda keys: load_image_set(read_facts(params), keys, plan.recipe.image_size,  # noqa: E731
                                       params.validate_.mask_threshold, params.paths.cache)
    train, val = load(plan.train_keys), load(plan.val_keys)

    def first_epoch_done(epoch: int, metrics: dict[str, float]) -> None:
        for path in aside:  # the new run has its first epoch: the other settings' checkpoints may go
            path.unlink(missing_ok=True)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    result = fit(model, plan.recipe, train, val, resolve_device(params.device), checkpoint, plan.seed, plan.task,
                 resume=resume, on_epoch=first_epoch_done, checkpoint_extra={"fingerprint": plan.fingerprint})
    return model, result
