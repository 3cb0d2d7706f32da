"""Checkpoints: the per-epoch training state and the trained deliverable (``model.pt``), both loaded with
``weights_only=True`` and tagged with polypflow's format; a checkpoint of other settings is set aside, never
deleted."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from models import build_model
from models.tta import with_temperature
from polypflow.io import atomic_path

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "polypflow-checkpoint-v1"
REMEDY = "restore it from a copy, or delete it and run `dvc repro` (its stage trains it again)"


def load_checkpoint(path: Path) -> dict:
    """Load one of our checkpoints with ``weights_only=True``; a foreign file is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refuses anything but tensors and plain containers
        raise ValueError(f"{path}: not a loadable polypflow checkpoint ({type(exc).__name__}: {exc}); {REMEDY}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a polypflow checkpoint (missing format tag {CHECKPOINT_FORMAT!r}); {REMEDY}")
    return state


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


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
    """Rebuild a model saved by :func:`save_trained` (``weights_only`` load), at the temperature it was shipped with
    (``models.tta.temperature``); return it with its metadata."""
    meta = load_checkpoint(path)
    model = build_model(meta["arch"], **{**meta["model_kwargs"], "pretrained": "none"})
    model.load_state_dict(meta.pop("state_dict"))
    return with_temperature(model, meta.get("temperature", 1.0)).eval(), meta


def set_aside_foreign(checkpoint: Path, fingerprint: str) -> list[Path]:
    """Keep every checkpoint of other settings beside the path (``<name>.other-<its fingerprint>``), never delete it
    here: a typo fixed a minute later must not cost hours of training. A checkpoint of other settings at the path is
    moved aside; one set aside earlier whose settings are these (``fingerprint``) is taken back, so the run resumes
    it. Returns the checkpoints left aside, to be removed once this run has its first epoch."""
    if checkpoint.exists():
        theirs = load_checkpoint(checkpoint).get("fingerprint")
        if theirs != fingerprint:
            aside = checkpoint.with_name(f"{checkpoint.name}.other-{theirs or 'unknown'}")
            checkpoint.replace(aside)
            log.info("%s belongs to other settings: kept as %s until this run has its first epoch", checkpoint,
                     aside.name)
    ours = checkpoint.with_name(f"{checkpoint.name}.other-{fingerprint}")
    if ours.exists() and not checkpoint.exists():
        ours.replace(checkpoint)
        log.info("%s: taken back (its settings are these ones); the run resumes it", ours.name)
    return sorted(checkpoint.parent.glob(f"{checkpoint.name}.other-*"))
