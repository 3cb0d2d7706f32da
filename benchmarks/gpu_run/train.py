"""Training and evaluation: IC-PolypSeg on EfficientNet-Lite0 (``methods.ic_polypseg_lite0``'s model, offline
ImageNet weights) with the recipe ``profiles/paper.yaml`` gives that entry, through the project's own trainer
(:func:`polypflow.train.engine.fit`), stopped by wall time; then scored on every test set by the project's own
evaluation (:meth:`~polypflow.tasks.segmentation.SegmentationTask.score_maps`: each map at its mask's original
resolution; mDice at ``evaluate.threshold`` and the toolbox's meanDic among the rest).

Wall time: after each epoch (checkpoint written), when the next epoch would end past the deadline, the run stops
and ``fit`` is called once more with ``resume`` and the epochs done, which trains nothing and leaves the model with
the weights of its best validation epoch, as a finished ``fit`` does.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.bench.common import Setup, failure
from benchmarks.bench.loading import loader_throughput
from benchmarks.bench.paper import PAPER_PROFILE, paper_settings
from benchmarks.bench.throughput import train_throughput
from benchmarks.gpu_run.bundle import TRAIN_ENTRY, BundleError, extract_truth, image_set
from models import build_model
from polypflow.settings.config import Params, Recipe
from polypflow.tasks.segmentation import SegmentationTask, predict_probs
from polypflow.train.engine import FitResult, fit

# --smoke: a few small steps on the CPU (the bundle's size; no loader processes)
SMOKE_RECIPE = {"batch_size": 4, "num_workers": 0, "epochs": 3}


class TimeUp(Exception):
    """The next epoch would end past the deadline."""


@dataclass
class WallClock:
    """``fit``'s ``on_epoch``: marks each epoch's end, raises :class:`TimeUp` when another would overrun."""

    deadline: float                        # time.perf_counter() value
    marks: list[float] = field(default_factory=lambda: [time.perf_counter()])

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.marks.append(time.perf_counter())
        if self.marks[-1] + (self.marks[-1] - self.marks[-2]) > self.deadline:
            raise TimeUp

    @property
    def epoch_s(self) -> list[float]:
        return np.diff(self.marks).tolist()


@dataclass(frozen=True)
class TrainSettings:
    arch: str
    kwargs: dict
    recipe: Recipe
    source: dict  # where each part came from


def train_settings(params: Params, size: int, smoke: bool) -> TrainSettings:
    """The model of ``methods.<TRAIN_ENTRY>`` (with the paper profile's model keys over it) and the paper profile's
    recipe for that entry; ``--smoke`` shrinks the recipe to the bundle's size and a few CPU steps."""
    paper = paper_settings(PAPER_PROFILE, params, TRAIN_ENTRY)
    arch, kwargs = params.method_arch(TRAIN_ENTRY)
    recipe = paper.recipe
    if smoke:
        recipe = Recipe.model_validate({**recipe.model_dump(), **SMOKE_RECIPE, "image_size": size})
    if recipe.image_size != size:
        raise BundleError(f"the bundle's images are {size} px, {PAPER_PROFILE} trains {TRAIN_ENTRY} at "
                          f"{recipe.image_size} px: rebuild it with `python -m benchmarks.gpu_run.bundle`")
    source = {"model": f"methods.{TRAIN_ENTRY} (methods.yaml)", "recipe": f"methods.{TRAIN_ENTRY} of {PAPER_PROFILE}",
              "inherited": paper.inherited, "inherited_from": paper.inherited_from, "smoke": SMOKE_RECIPE if smoke else None}
    return TrainSettings(arch, {**kwargs, **paper.profile_model}, recipe, source)


def loader_and_step(settings: TrainSettings, train: Any, setup: Setup) -> dict:
    """images/s of the trainer's DataLoader alone (the recipe's workers and batch) and of the trainer's step alone
    on batches already on the device (:func:`benchmarks.bench.throughput.train_throughput`)."""
    r = settings.recipe
    out: dict[str, Any] = {}
    try:
        out["loader_images_per_s"] = loader_throughput(train, r.augment, r.num_workers, r.batch_size, passes=1)
    except Exception as exc:
        out["loader_status"] = failure(exc)
    try:
        step = train_throughput(settings.arch, {**settings.kwargs, "pretrained": "none"}, r, r.image_size, r.batch_size,
                                setup)
        out.update(step_images_per_s=step["images_per_s"], step_p50_ms=step["p50_ms"], amp=step["amp"])
    except Exception as exc:  # out of memory included
        out["step_status"] = failure(exc)
    return out


def train(settings: TrainSettings, train_set: Any, val_set: Any, params: Params, device: torch.device,
          workdir: Path, minutes: float) -> tuple[torch.nn.Module, FitResult, dict]:
    """Fit until the recipe's epochs, early stopping or ``minutes`` of wall time, whichever comes first."""
    recipe, checkpoint = settings.recipe, workdir / "checkpoint.pt"
    torch.manual_seed(params.seed)
    model = build_model(settings.arch, **settings.kwargs)
    clock = WallClock(time.perf_counter() + 60 * minutes)
    task = SegmentationTask(params, recipe)
    try:
        result = fit(model, recipe, train_set, val_set, device, checkpoint, params.seed, task, on_epoch=clock)
        stopped = "early stopping (patience)" if result.epochs_run < recipe.epochs else "the recipe's epochs"
    except TimeUp:
        done = Recipe.model_validate({**recipe.model_dump(), "epochs": len(clock.epoch_s)})
        result = fit(model, done, train_set, val_set, device, checkpoint, params.seed, task, resume=True)
        stopped = f"wall time ({minutes:g} min)"
    epoch_s = clock.epoch_s
    report = {"epochs": result.epochs_run, "epochs_max": recipe.epochs, "stopped_by": stopped,
              "best_epoch": result.best_epoch, "best_val_dice": result.best_score, "threshold": result.threshold,
              "train_images": len(train_set.keys), "val_images": len(val_set.keys), "epoch_s": epoch_s,
              "train_wall_s": clock.marks[-1] - clock.marks[0],
              "images_per_s": len(train_set.keys) * len(epoch_s) / max(sum(epoch_s), 1e-9),
              "history": result.history}
    return model, result, report


def evaluate(model: torch.nn.Module, recipe: Recipe, threshold: float, zf: zipfile.ZipFile, test: dict[str, list[str]],
             params: Params, device: torch.device, workdir: Path) -> dict[str, dict]:
    """Each test set through the project's predictor and :meth:`SegmentationTask.score_maps`: ``mdice`` at
    ``evaluate.threshold`` (the protocol's 0.5), ``meandic`` the toolbox's mean Dice over 256 thresholds; the
    whole summary beside them."""
    task, sets = SegmentationTask(params, recipe), {}
    model.eval()
    for dataset, keys in test.items():
        if not keys:
            continue
        start = time.perf_counter()
        data = image_set(zf, keys)
        probs = predict_probs(model, data.images, recipe.normalize, device, recipe.channels_last)
        facts = extract_truth(zf, keys, workdir / "truth")
        _, summary = task.score_maps(keys, list(probs), threshold, facts)
        sets[dataset] = {"n": len(keys), "mdice": summary["dice"], "meandic": summary["tb_dice"],
                         "miou": summary["iou"], "eval_s": time.perf_counter() - start, "summary": summary}
        print(f"  test {dataset:>9} n={len(keys):<4} mDice {summary['dice']:.4f}  meanDic {summary['tb_dice']:.4f}",
              flush=True)
    return sets


def published(params: Params, paper: str = "pranet") -> dict[str, float]:
    """``paper``'s published test mDice per dataset, from ``report.paper_figures``."""
    figures = yaml.safe_load(Path(params.report.paper_figures).read_text()).get("figures", [])
    return {f["dataset"]: f["value"] for f in figures if f.get("paper") == paper and f.get("metric") == "dice"
            and f.get("dataset") and (f.get("scope") or "test") == "test"}
