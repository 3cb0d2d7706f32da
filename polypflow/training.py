"""The one trainer for every registered method: fit with checkpoints, resume, early stopping.

Each epoch is seeded with ``seed + epoch`` (shuffle, augmentation, dropout), so a run resumed from its
last checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

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

from polypflow.config import Recipe
from polypflow.data import ImageSet, SegDataset
from polypflow.inference import Predictor, TorchBackend
from polypflow.io import atomic_path
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


def train_epoch(model, loader, loss_fn, optimizer, recipe: Recipe, device, epoch: int) -> float:
    model.train()
    rng = np.random.default_rng(epoch)
    total, count = 0.0, 0
    amp = amp_enabled(recipe, device)
    for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", mininterval=5, leave=False):
        x, y = _rescale(x.to(device), y.to(device), float(rng.choice(recipe.multiscale)))
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        loss = loss_fn(tuple(o.float() for o in outputs), y, epoch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


def fit(model: nn.Module, recipe: Recipe, train: ImageSet, val: ImageSet, device: torch.device,
        checkpoint: Path, seed: int, resume: bool = False,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_extra: dict | None = None) -> FitResult:
    """Train ``model`` in place; leave it holding the best-validation-Dice weights.

    ``checkpoint`` is rewritten atomically after every epoch; with ``resume`` an existing one is
    continued from the epoch after the last completed one.
    """
    model.to(device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    log.info("training on %s: AMP (bf16) %s, channels-last %s", device, "on" if amp_enabled(recipe, device) else "off",
             "on" if recipe.channels_last else "off")
    loss_fn = build_loss(recipe.loss, recipe.deep_supervision_weights)
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
    dataset = SegDataset(train, recipe.normalize, recipe.augment)
    for epoch in range(state["epoch"] + 1, recipe.epochs):
        if state["bad_epochs"] >= recipe.early_stop_patience:
            break
        seed_everything(seed + epoch)
        if dataset.transform is not None:  # albumentations keeps its own RNG, untouched by seed_everything
            dataset.transform.set_random_seed(seed + epoch)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=len(dataset) > recipe.batch_size,
                            num_workers=recipe.num_workers, generator=torch.Generator().manual_seed(seed + epoch))
        train_loss = train_epoch(model, loader, loss_fn, optimizer, recipe, device, epoch)
        scheduler.step()
        probs = predict_probs(model, val.images, recipe.normalize, device, channels_last=recipe.channels_last)
        val_dice = float(dice_batch(probs, val.masks).mean()) if len(val.keys) else 0.0
        metrics = {"train_loss": train_loss, "val_dice": val_dice, "lr": optimizer.param_groups[0]["lr"]}
        if recipe.threshold_search and len(val.keys):
            metrics["val_dice_tuned"] = float(grid_dice(probs, val.masks).max())
        best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] > 0 else None
        state["history"].append({"epoch": epoch + 1, **metrics})
        if best is None or selection_score(metrics) > selection_score(best):
            state.update(best_val_dice=val_dice, best_epoch=epoch + 1, bad_epochs=0,
                         best_model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), **state, **(checkpoint_extra or {}))
        log.info("epoch %d/%d train_loss %.4f val_dice %.4f%s", epoch + 1, recipe.epochs, train_loss, val_dice,
                 f", val_dice_tuned {metrics['val_dice_tuned']:.4f} (at the grid's best threshold)"
                 if "val_dice_tuned" in metrics else "")
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    threshold = 0.5
    if recipe.threshold_search and len(train.keys):
        probs = predict_probs(model, train.images, recipe.normalize, device, channels_last=recipe.channels_last)
        threshold = search_threshold(probs, train.masks)
    return FitResult(state["best_val_dice"], state["best_epoch"], state["epoch"] + 1,
                     state["epoch"] + 1 < recipe.epochs, threshold, state["history"])


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
