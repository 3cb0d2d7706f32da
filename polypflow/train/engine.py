"""The one trainer for every task: fit with checkpoints, resume, early stopping; it knows no task.

What differs between segmentation and detection (dataset items, loss, how targets follow a resized batch, what
validation scores, the threshold a model ships with) is the task's, through :class:`TrainingTask`, as a
LightningModule hides its task from the Trainer. Each epoch is seeded with ``seed + epoch`` (shuffle,
augmentation, dropout), so a run resumed from its last checkpoint continues exactly as the uninterrupted run
would have.

With ``recipe.ema_decay`` an exponential moving average of the weights and buffers is what is validated, selected,
checkpointed for resume and left in the model; the raw weights' validation metrics are recorded beside it
(``val_*_raw``) unless ``recipe.validate_raw`` is off (a diagnostic: one more validation pass per epoch, nothing
trained or selected depends on it). Epochs before ``recipe.validate_from`` are trained without validation (and so
are never selected). It is timm's ``ModelEmaV3`` with its warm-up (the decay grows with the step up
to ``ema_decay``): on IC-PolypSeg a fixed decay of 0.99 from the first step (``torch.optim.swa_utils.AveragedModel``)
left validation Dice at 0 for all of a 4-epoch run whose raw weights reached 0.83. With ``recipe.resize_schedule``
each epoch trains at its own size (progressive resizing).

With ``recipe.distill_weight`` (and an EMA) the epochs from ``recipe.distill_from`` add that weight times the task's
``distill_loss`` between the model's outputs and the task's ``soft_target`` of the EMA on the same batch: the
shipped average teaches the raw weights (self-distillation). The task draws the teacher's view from a generator of
its own per epoch, so the batches, their scales and a resumed run are what they would be without it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from timm.utils import ModelEmaV3
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from polypflow.data.images import ImageSet
from polypflow.settings.config import Recipe
from polypflow.train.checkpoint import load_checkpoint, save_checkpoint
from polypflow.infer.device import amp_enabled

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingTask(Protocol):
    """What :func:`fit` needs of a task (``polypflow.tasks`` implements it for each)."""

    metric: str  # the validation metric reported as the fit's best score (val_dice, val_ap50, ...)
    collate: Callable | None  # the DataLoader's collate_fn (None: default stacking)

    def dataset(self, data: ImageSet) -> Dataset: ...
    def target_to(self, target: Any, device: torch.device) -> Any: ...
    def rescale_target(self, target: Any, size: int, factor: float) -> Any: ...
    def loss(self, model: nn.Module, outputs: Any, target: Any, epoch: int) -> torch.Tensor: ...
    def validate(self, model: nn.Module, val: ImageSet, device: torch.device) -> dict[str, float]: ...
    def select(self, metrics: dict[str, float]) -> float: ...
    def threshold(self, model: nn.Module, train: ImageSet, device: torch.device) -> float: ...
    # self-distillation (only when ``recipe.distill_weight`` is set; ``check`` refuses it where a task has none)
    def soft_target(self, teacher: nn.Module, x: torch.Tensor, rng: np.random.Generator) -> Any: ...
    def distill_loss(self, outputs: Any, soft: Any) -> torch.Tensor: ...


@dataclass
class FitResult:
    best_score: float  # the task's metric at the selected epoch (a segmenter's val Dice at 0.5, a detector's AP50)
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    threshold: float = 0.5
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LRScheduler:
    if recipe.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    power = 0.9 if recipe.scheduler == "poly" else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / recipe.epochs) ** power)


def rescale(x: torch.Tensor, target: Any, scale: float, task: TrainingTask) -> tuple[torch.Tensor, Any]:
    """Multi-scale training: the batch resized by ``scale`` (to a multiple of 32), its targets with it (the task's)."""
    if scale == 1.0:
        return x, target
    size = max(32, int(round(x.shape[-1] * scale / 32)) * 32)
    factor = size / x.shape[-1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, task.rescale_target(target, size, factor)


Teacher = Callable[[torch.Tensor], Any]  # a batch -> the task's soft target for it (no gradient)


def train_step(model: nn.Module, x: torch.Tensor, target: Any, task: TrainingTask, optimizer: torch.optim.Optimizer,
               channels_last: bool, amp: bool, epoch: int, teacher: Teacher | None = None,
               distill_weight: float = 0.0) -> torch.Tensor:
    """One optimisation step on a batch already on the device: channels-last input if asked, forward under bf16
    autocast when ``amp`` (:func:`~polypflow.infer.device.amp_enabled`), the task's loss in fp32 (plus
    ``distill_weight`` times its distillation loss towards ``teacher``'s soft target, when given), backward,
    optimiser step. Returns the (detached) loss; a non-finite loss raises before the weights change."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(x)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x)
    loss = task.loss(model, outputs, target, epoch)
    if teacher is not None:
        loss = loss + distill_weight * task.distill_loss(outputs, soft)
    if not torch.isfinite(loss):
        raise RuntimeError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}")
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model: nn.Module, loader: DataLoader, task: TrainingTask, optimizer: torch.optim.Optimizer,
                recipe: Recipe, device: torch.device, epoch: int, ema: ModelEmaV3 | None = None) -> float:
    model.train()
    rng = np.random.default_rng(epoch)
    total, count = 0.0, 0
    amp = amp_enabled(recipe, device)
    size = recipe.train_size(epoch) / recipe.image_size
    teacher = None
    if ema is not None and recipe.distill_weight and epoch + 1 >= recipe.distill_from:
        views = np.random.default_rng([epoch, 1])  # the teacher's own draws: the batches' scales stay as without it
        teacher = lambda x: task.soft_target(ema.module, x, views)  # noqa: E731
    for step, (images, target) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", mininterval=5,
                                                  leave=False), start=epoch * len(loader) + 1):
        scale = size * float(rng.choice(recipe.multiscale))
        x, target = rescale(images.to(device), task.target_to(target, device), scale, task)
        loss = train_step(model, x, target, task, optimizer, recipe.channels_last, amp, epoch, teacher,
                          recipe.distill_weight).item()
        if ema is not None:
            ema.update(model, step)
        total += loss * len(x)
        count += len(x)
    return total / max(count, 1)


def fit(model: nn.Module, recipe: Recipe, train: ImageSet, val: ImageSet, device: torch.device, checkpoint: Path,
        seed: int, task: TrainingTask, resume: bool = False, on_epoch: EpochCallback | None = None,
        checkpoint_extra: dict | None = None) -> FitResult:
    """Train ``model`` in place; leave it holding the weights of the best validation epoch (by ``task.select``).

    ``checkpoint`` is rewritten atomically after every epoch; with ``resume`` an existing one is continued from
    the epoch after the last completed one.
    """
    model.to(device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    log.info("training on %s: AMP (bf16) %s, channels-last %s", device, "on" if amp_enabled(recipe, device) else "off",
             "on" if recipe.channels_last else "off")
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True) if recipe.ema_decay else None
    shipped = model if ema is None else ema.module  # the weights validated, selected and left in the model
    state = {"epoch": -1, "best_val_dice": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_model": None}
    if resume and checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = {k: saved[k] for k in state}
        log.info("resuming %s after epoch %d", checkpoint, state["epoch"] + 1)
    dataset = task.dataset(train)
    for epoch in range(state["epoch"] + 1, recipe.epochs):
        if state["bad_epochs"] >= recipe.early_stop_patience:
            break
        seed_everything(seed + epoch)
        if dataset.transform is not None:  # albumentations keeps its own RNG, untouched by seed_everything
            dataset.transform.set_random_seed(seed + epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=len(dataset) > recipe.batch_size,
                            num_workers=recipe.num_workers, collate_fn=task.collate,
                            generator=torch.Generator().manual_seed(seed + epoch))
        train_loss = train_epoch(model, loader, task, optimizer, recipe, device, epoch, ema)
        scheduler.step()
        validated = epoch + 1 >= recipe.validate_from
        metrics = {"train_loss": train_loss, **(task.validate(shipped, val, device) if validated else {}),
                   "lr": optimizer.param_groups[0]["lr"]}
        if validated and ema is not None and recipe.validate_raw:
            metrics.update({f"{k}_raw": v for k, v in task.validate(model, val, device).items()})
        best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] > 0 else None
        state["history"].append({"epoch": epoch + 1, **metrics})
        if validated and (best is None or task.select(metrics) > task.select(best)):
            # "best_val_dice" is the checkpoint format's name for the best score of any task
            state.update(best_val_dice=metrics[task.metric], best_epoch=epoch + 1, bad_epochs=0,
                         best_model={k: v.detach().cpu().clone() for k, v in shipped.state_dict().items()})
        elif validated:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), **({} if ema is None else {"ema": ema.state_dict()}),
                        **state, **(checkpoint_extra or {}))
        log.info("epoch %d/%d at %d px train_loss %.4f %s", epoch + 1, recipe.epochs, recipe.train_size(epoch),
                 train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")))
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    threshold = task.threshold(model, train, device)
    return FitResult(state["best_val_dice"], state["best_epoch"], state["epoch"] + 1,
                     state["epoch"] + 1 < recipe.epochs, threshold, state["history"])
