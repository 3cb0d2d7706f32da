"""The one trainer for every registered method: fit with checkpoints, resume, early stopping.

Each epoch is seeded with ``seed + epoch`` (shuffle, augmentation, dropout), so a run resumed from its
last checkpoint continues exactly as the uninterrupted run would have. A configured method is resolved once
into a :class:`MethodPlan` (architecture, builder kwargs, recipe, images) that train, crossval and
lr_search all fit through :func:`fit_plan`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from polypflow.config import Params, Recipe
from polypflow.data import ImageSet, SegDataset, load_image_set
from polypflow.inference import Predictor, TorchBackend
from polypflow.io import atomic_path
from polypflow.layout import read_facts
from polypflow.losses import build_loss
from polypflow.metrics import dice_batch

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "polypflow-checkpoint-v1"


@dataclass
class FitResult:
    best_val_dice: float  # val Dice at 0.5 of the selected epoch (selected on it, or on val_dice_tuned)
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    threshold: float = 0.5
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params.yaml asks for device: cuda, but no CUDA device is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast speeds ``device`` up: always on CUDA, on a CPU only with native bf16 (AVX512-BF16
    or AMX); elsewhere emulated bf16 would be slower than fp32."""
    if device.type == "cuda":
        return True
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in native)


def amp_enabled(recipe: Recipe, device: torch.device) -> bool:
    """bf16 autocast when the recipe asks for AMP and it pays on ``device``; otherwise training stays fp32."""
    return recipe.amp and bf16_pays(device)


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


def load_checkpoint(path: Path) -> dict:
    """Load one of our checkpoints with ``weights_only=True``; a foreign file is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refuses anything but tensors and plain containers
        raise ValueError(f"{path}: not a loadable polypflow checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a polypflow checkpoint (missing format tag {CHECKPOINT_FORMAT!r})")
    return state


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def predict_probs(model: nn.Module, images: np.ndarray, normalize: str, device: torch.device,
                  batch_size: int = 16, channels_last: bool = False) -> np.ndarray:
    """Main-map probabilities (N×S×S float32) for uint8 images N×S×S×3, by :class:`polypflow.inference.Predictor`."""
    backend = TorchBackend(model, normalize, device, channels_last)
    return Predictor(backend, images.shape[1], batch_size=batch_size).probs(images)


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def grid_dice(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean Dice at each threshold of :data:`THRESHOLD_GRID`."""
    return np.array([dice_batch(probs, masks, t).mean() for t in THRESHOLD_GRID])


def selection_score(metrics: dict) -> float:
    """What epochs are selected on: the val Dice the model will be used with, i.e. ``val_dice_tuned`` (at the
    grid's best threshold) when the recipe searches its threshold after training, else ``val_dice`` (at 0.5)."""
    return metrics.get("val_dice_tuned", metrics["val_dice"])


def search_threshold(probs: np.ndarray, masks: np.ndarray) -> float:
    """The binarisation threshold maximising mean Dice (grid 0.05..0.95), as CRIS chooses it."""
    return float(THRESHOLD_GRID[int(np.argmax(grid_dice(probs, masks)))])


def _rescale(x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if scale == 1.0:
        return x, y
    size = max(32, int(round(x.shape[-1] * scale / 32)) * 32)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = (F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()
    return x, y


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, optimizer: torch.optim.Optimizer,
               recipe: Recipe, amp: bool, epoch: int) -> torch.Tensor:
    """One optimisation step on a batch already on the device: channels-last input if the recipe says so,
    forward under bf16 autocast when ``amp`` (:func:`amp_enabled`), loss in fp32, backward, optimiser step.
    Returns the (detached) loss; a non-finite loss raises before the weights change."""
    if recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(x)
    loss = loss_fn(tuple(o.float() for o in outputs), y, epoch)
    if not torch.isfinite(loss):
        raise RuntimeError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}")
    loss.backward()
    optimizer.step()
    return loss.detach()


class SegmentationTask:
    """What :func:`fit` needs of a segmenter: its dataset, one optimisation step, the validation metrics and the
    score epochs are selected on (:func:`selection_score`). :class:`polypflow.detection.training.DetectionTask`
    is the detector's."""

    metric = "val_dice"
    collate = None  # the default collate: image and mask tensors stack

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.loss_fn = build_loss(recipe.loss, recipe.deep_supervision_weights)

    def dataset(self, data: ImageSet) -> SegDataset:
        return SegDataset(data, self.recipe.normalize, self.recipe.augment)

    def step(self, model: nn.Module, batch, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool,
             epoch: int, scale: float) -> tuple[float, int]:
        x, y = _rescale(batch[0].to(device), batch[1].to(device), scale)
        return train_step(model, x, y, self.loss_fn, optimizer, self.recipe, amp, epoch).item(), len(x)

    def validate(self, model: nn.Module, val: ImageSet, device: torch.device) -> dict[str, float]:
        probs = predict_probs(model, val.images, self.recipe.normalize, device, channels_last=self.recipe.channels_last)
        metrics = {"val_dice": float(dice_batch(probs, val.masks).mean()) if len(val.keys) else 0.0}
        if self.recipe.threshold_search and len(val.keys):
            metrics["val_dice_tuned"] = float(grid_dice(probs, val.masks).max())
        return metrics

    def select(self, metrics: dict[str, float]) -> float:
        return selection_score(metrics)

    def threshold(self, model: nn.Module, train: ImageSet, device: torch.device) -> float:
        """The binarisation threshold the model is used with: searched on the train set when the recipe says so."""
        if not (self.recipe.threshold_search and len(train.keys)):
            return 0.5
        probs = predict_probs(model, train.images, self.recipe.normalize, device, channels_last=self.recipe.channels_last)
        return search_threshold(probs, train.masks)


def train_epoch(model, loader, task, optimizer, recipe: Recipe, device, epoch: int) -> float:
    model.train()
    rng = np.random.default_rng(epoch)
    total, count = 0.0, 0
    amp = amp_enabled(recipe, device)
    for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", mininterval=5, leave=False):
        loss, n = task.step(model, batch, optimizer, device, amp, epoch, float(rng.choice(recipe.multiscale)))
        total += loss * n
        count += n
    return total / max(count, 1)


def fit(model: nn.Module, recipe: Recipe, train: ImageSet, val: ImageSet, device: torch.device,
        checkpoint: Path, seed: int, resume: bool = False,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_extra: dict | None = None, task=None) -> FitResult:
    """Train ``model`` in place; leave it holding the weights of the best validation epoch.

    ``task`` (default :class:`SegmentationTask`) says how a batch is trained and what validation scores; the
    result's ``best_val_dice`` is the selected epoch's ``task.metric`` (Dice at 0.5 for a segmenter, AP50 for
    a detector). ``checkpoint`` is rewritten atomically after every epoch; with ``resume`` an existing one is
    continued from the epoch after the last completed one.
    """
    task = task or SegmentationTask(recipe)
    model.to(device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    log.info("training on %s: AMP (bf16) %s, channels-last %s", device, "on" if amp_enabled(recipe, device) else "off",
             "on" if recipe.channels_last else "off")
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    state = {"epoch": -1, "best_val_dice": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_model": None}
    if resume and checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
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
        train_loss = train_epoch(model, loader, task, optimizer, recipe, device, epoch)
        scheduler.step()
        metrics = {"train_loss": train_loss, **task.validate(model, val, device), "lr": optimizer.param_groups[0]["lr"]}
        best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] > 0 else None
        state["history"].append({"epoch": epoch + 1, **metrics})
        if best is None or task.select(metrics) > task.select(best):
            state.update(best_val_dice=metrics[task.metric], best_epoch=epoch + 1, bad_epochs=0,
                         best_model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), **state, **(checkpoint_extra or {}))
        log.info("epoch %d/%d train_loss %.4f %s", epoch + 1, recipe.epochs, train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")) +
                 (" (tuned: at the grid's best threshold)" if "val_dice_tuned" in metrics else ""))
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    threshold = task.threshold(model, train, device)
    return FitResult(state["best_val_dice"], state["best_epoch"], state["epoch"] + 1,
                     state["epoch"] + 1 < recipe.epochs, threshold, state["history"])


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, values): the same weights give the same digest."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_trained(path: Path, model: nn.Module, **meta) -> None:
    """The deliverable: best weights plus what is needed to rebuild and use them."""
    save_checkpoint(path, state_dict={k: v.cpu() for k, v in model.state_dict().items()}, **meta)


def load_trained(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_trained` (``weights_only`` load); return it with its metadata."""
    from models import build_model

    meta = load_checkpoint(path)
    model = build_model(meta["arch"], **{**meta["model_kwargs"], "pretrained": "none"})
    model.load_state_dict(meta.pop("state_dict"))
    return model.eval(), meta


# ---------------------------------------------------------------- a configured method, resolved once


def subsample(keys: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded subset of at most ``limit`` keys (all of them when ``limit`` is None)."""
    if limit is None or len(keys) <= limit:
        return list(keys)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(keys, size=limit, replace=False).tolist())


@dataclass(frozen=True)
class MethodPlan:
    """A configured method resolved once: what to build, how to train it and on which images."""

    method: str
    arch: str
    kwargs: dict
    recipe: Recipe
    train_keys: list[str]
    val_keys: list[str]
    seed: int
    task: str = "segmentation"  # the builder's task (models.method_task): "segmentation" or "detection"

    @property
    def fingerprint(self) -> str:
        """Identifies the settings a checkpoint was trained with (resume only a checkpoint of the same plan)."""
        parts = (self.arch, self.kwargs, self.recipe.model_dump(), self.train_keys, self.val_keys, self.seed)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_method(params: Params, method: str, train_keys: list[str], val_keys: list[str],
                recipe: Recipe | None = None, seed_offset: int = 0) -> MethodPlan:
    """``method`` of params with its recipe (or ``recipe``), its training images subsampled to the recipe's
    ``max_train_items`` (seeded with ``seed + seed_offset``)."""
    from models import check_kwargs, method_task

    arch, kwargs = params.method_arch(method)
    check_kwargs(arch, kwargs, f"methods.{method}.model")
    recipe = recipe or params.recipe(method)
    return MethodPlan(method, arch, kwargs, recipe, subsample(train_keys, recipe.max_train_items, params.seed + seed_offset),
                      list(val_keys), params.seed, method_task(arch))


DETECTION_LOSS = "gfl"  # a detector's recipe names its loss: GFLv2's (quality focal + distribution focal + GIoU)


def check_loss(plan: MethodPlan) -> None:
    """A bad ``loss`` is an error naming the method, before anything is built or changed on disk."""
    if plan.task == "detection":
        if plan.recipe.loss != DETECTION_LOSS:
            raise ValueError(f"methods.{plan.method}.recipe.loss: a detection method trains with loss "
                             f"{DETECTION_LOSS!r}, got {plan.recipe.loss!r}")
    else:
        build_loss(plan.recipe.loss, plan.recipe.deep_supervision_weights)


def build_checked(plan: MethodPlan) -> nn.Module:
    """The plan's model, built with its loss checked too: a bad setting fails before anything on disk changes."""
    from models import build_model

    check_loss(plan)
    seed_everything(plan.seed)
    return build_model(plan.arch, **plan.kwargs)


def training_min_area(params: Params, image_size: int) -> int:
    """``detection.min_box_area`` (pixels of a mask at its own resolution, taken as a 352 px frame) at
    ``image_size``: the speck size of the training targets."""
    return int(round(params.detection.min_box_area * (image_size / 352) ** 2))


def plan_task(params: Params, plan: MethodPlan):
    """The :func:`fit` task of ``plan``: how a batch is trained and what validation selects on."""
    if plan.task == "detection":
        from polypflow.detection.training import DetectionTask

        cfg = params.detection
        return DetectionTask(plan.recipe, training_min_area(params, plan.recipe.image_size), cfg.atss_topk,
                             cfg.match_score)
    return SegmentationTask(plan.recipe)


def set_aside_foreign(checkpoint: Path, fingerprint: str) -> list[Path]:
    """Move a checkpoint of other settings beside the path (``<name>.other-<its fingerprint>``), never delete it:
    a typo fixed a minute later must not cost hours of training. Returns every checkpoint so set aside (earlier
    ones too), to be removed once this run has its first epoch."""
    if checkpoint.exists():
        theirs = load_checkpoint(checkpoint).get("fingerprint")
        if theirs != fingerprint:
            aside = checkpoint.with_name(f"{checkpoint.name}.other-{theirs or 'unknown'}")
            checkpoint.replace(aside)
            log.info("%s belongs to other settings: kept as %s until this run has its first epoch", checkpoint,
                     aside.name)
    return sorted(checkpoint.parent.glob(f"{checkpoint.name}.other-*"))


def fit_plan(params: Params, plan: MethodPlan, checkpoint: Path, resume: bool,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> tuple[nn.Module, FitResult]:
    """Build the plan's model, load its images and fit it to ``checkpoint``: the one core of train, crossval and
    lr_search."""
    model = build_checked(plan)
    aside = set_aside_foreign(checkpoint, plan.fingerprint) if resume else []
    load = lambda keys: load_image_set(read_facts(params), keys, plan.recipe.image_size,  # noqa: E731
                                       params.validate_.mask_threshold, params.paths.cache)
    train, val = load(plan.train_keys), load(plan.val_keys)

    def first_epoch_done(epoch: int, metrics: dict[str, float]) -> None:
        for path in aside:  # the new run has its first epoch: the other settings' checkpoints may go
            path.unlink(missing_ok=True)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    result = fit(model, plan.recipe, train, val, resolve_device(params.device), checkpoint, plan.seed,
                 resume=resume, on_epoch=first_epoch_done, checkpoint_extra={"fingerprint": plan.fingerprint},
                 task=plan_task(params, plan))
    return model, result
