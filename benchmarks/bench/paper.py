"""Paper-profile timing: IC-PolypSeg as ``profiles/paper.yaml`` configures it, a few epochs through
:func:`polypflow.train.engine.fit` on the PraNet split's cached images, extrapolated to the recipe's epochs.

The recipe is the profile's own: its ``train.defaults``, then ``methods.<entry>.recipe`` (as
:meth:`polypflow.settings.config.Params.recipe` merges). The profile is an overlay: the keys it leaves unset come from
the settings it overlays (params.yaml's ``train.defaults``), and without those from the Recipe's defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.bench.common import Setup, failure
from models import build_model
from polypflow.settings.config import Recipe
from polypflow.data.images import ImageSet, load_image_set, read_facts, read_splits
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.train.engine import fit

PAPER_PROFILE = Path("profiles/paper.yaml")
PAPER_ENTRY = "ic_polypseg_ef0"      # IC-PolypSeg-EF0, the paper's configuration
PAPER_ARCH = "ic_polypseg"           # the entry's architecture where the overlay does not name it
PAPER_SEED = 42
# Without a usable params.yaml: PraNet's training lists (Kvasir-SEG 900 + CVC-ClinicDB 550), 10 % of each to val
PRANET_TRAIN, VAL_FRACTION = {"kvasir": 900, "clinicdb": 550}, 0.1


@dataclass(frozen=True)
class PaperSettings:
    """What the timing builds and trains, and where each part came from."""

    profile: Path
    entry: str
    arch: str
    kwargs: dict             # the profile's model kwargs with pretrained="none"
    profile_model: dict      # the profile's model kwargs as written
    recipe: Recipe
    inherited: dict          # recipe keys the profile leaves unset, with their values
    inherited_from: str      # where those came from


def paper_settings(profile: Path, params: Any | None, entry: str = PAPER_ENTRY) -> PaperSettings:
    """``entry``'s model kwargs and recipe as ``profile`` sets them, built with ``pretrained="none"`` (the
    profile's hub weights need internet; the timing does not depend on them)."""
    data = yaml.safe_load(Path(profile).read_text()) or {}
    spec = (data.get("methods") or {}).get(entry)
    if spec is None:
        raise KeyError(f"{profile}: no methods.{entry}")
    own = {**((data.get("train") or {}).get("defaults") or {}), **(spec.get("recipe") or {})}
    if params is not None:
        base, source = params.train.defaults.model_dump(), "params.yaml train.defaults"
    else:
        base, source = {"normalize": "imagenet"}, "the Recipe's defaults, normalize imagenet (no usable params.yaml)"
    recipe = Recipe.model_validate({**base, **own})
    inherited = {k: v for k, v in recipe.model_dump().items() if k not in own}
    model = dict(spec.get("model") or {})
    return PaperSettings(Path(profile), entry, spec.get("arch", PAPER_ARCH), {**model, "pretrained": "none"}, model,
                         recipe, inherited, source)


def protocol_sizes(params: Any | None) -> dict[str, int]:
    """Train/val sizes of the PraNet protocol (``split.pranet_train``, ``val_fraction_of_train`` of each
    dataset), for the synthetic stand-in when the split itself is absent."""
    sizes, fraction = PRANET_TRAIN, VAL_FRACTION
    if params is not None:
        sizes, fraction = params.split.pranet_train, params.split.val_fraction_of_train
    val = sum(round(fraction * n) for n in sizes.values())
    return {"train": sum(sizes.values()) - val, "val": val}


def paper_data(params: Any | None, items: int | None, seed: int, size: int) -> tuple[ImageSet, ImageSet, dict]:
    """Train/val subsets of the PraNet split at ``size`` px from the project's cache, else synthetic arrays."""
    rng = np.random.default_rng(seed)
    try:
        if params is None:
            raise FileNotFoundError("no usable params.yaml")
        splits, facts = read_splits(params), read_facts(params)
        full = {"train": len(splits["train"]), "val": len(splits["val"])}
        n_train = min(items or full["train"], full["train"])
        n_val = max(1, round(n_train * full["val"] / full["train"]))
        keys = {k: sorted(rng.choice(splits[k], size=n, replace=False).tolist())
                for k, n in (("train", n_train), ("val", n_val))}
        load = lambda k: load_image_set(facts, k, size, params.validate_.mask_threshold, params.paths.cache)  # noqa: E731
        return load(keys["train"]), load(keys["val"]), {"data": f"real: {params.paths.splits} ({splits['scheme']})", **full}
    except Exception as exc:  # no params/splits/raw files on this machine: the timing does not depend on pixels
        full = protocol_sizes(params)
        n_train = min(items or full["train"], full["train"])
        n_val = max(1, round(n_train * full["val"] / full["train"]))
        make = lambda n: ImageSet([f"s/{i}" for i in range(n)],  # noqa: E731
                                  rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                                  (rng.random((n, size, size)) > 0.7).astype(np.uint8))
        return make(n_train), make(n_val), {"data": f"synthetic ({failure(exc)[8:120]})", **full}


def bench_paper(params: Any | None, profile: Path, epochs: int, items: int | None, setup: Setup) -> dict:
    """Time ``epochs`` epochs of the profile's IC-PolypSeg through ``fit``; extrapolate to the recipe's epochs."""
    settings = paper_settings(profile, params)
    recipe = Recipe.model_validate({**settings.recipe.model_dump(), "epochs": epochs})
    start = time.perf_counter()
    train, val, report = paper_data(params, items, PAPER_SEED, recipe.image_size)
    report["data_load_s"] = time.perf_counter() - start
    marks = [time.perf_counter()]
    torch.manual_seed(0)
    model = build_model(settings.arch, **settings.kwargs)
    fit(model, recipe, train, val, setup.device, setup.workdir / "paper-checkpoint.pt", seed=PAPER_SEED,
        task=SegmentationTask(params, recipe), on_epoch=lambda epoch, metrics: marks.append(time.perf_counter()))
    epoch_s = np.diff(marks).tolist()
    scale = report["train"] / len(train.keys)
    steady = epoch_s[-1] if len(epoch_s) > 1 else epoch_s[0]
    full_epochs = settings.recipe.epochs
    report.update(settings={"file": str(settings.profile), "entry": settings.entry, "arch": settings.arch,
                            "profile_model": settings.profile_model, "inherited": settings.inherited,
                            "inherited_from": settings.inherited_from},
                  model=settings.kwargs, recipe=settings.recipe.model_dump(), epochs_timed=epochs,
                  train_items_timed=len(train.keys), val_items_timed=len(val.keys), epoch_s=epoch_s,
                  full_epoch_s_estimate=steady * scale, epochs_full=full_epochs,
                  extrapolated_100_epochs_min=steady * scale * full_epochs / 60,  # the key predates epochs_full
                  method_of_extrapolation="last timed epoch (train subset + proportional val subset + checkpoint) "
                                          f"x {scale:.1f} (full train / timed train) x {full_epochs} epochs; no early stop")
    return report
