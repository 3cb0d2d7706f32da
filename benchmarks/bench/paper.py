"""Paper-profile timing: IC-PolypSeg-EF0 on the PraNet protocol through ``polypflow.training.fit``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.bench.common import Setup, failure
from models import build_model
from polypflow.data import ImageSet, load_image_set

# IC-PolypSeg on the PraNet protocol (METHODS.md section 1): the recipe timed by --paper-ic-polypseg
PAPER_IC_POLYPSEG_MODEL = {"encoder": "efficientnet_b0", "pretrained": "none"}
PAPER_IC_POLYPSEG_RECIPE = {
    "image_size": 352, "batch_size": 16, "multiscale": [0.75, 1.0, 1.25], "optimizer": "adamw", "lr": 1e-4,
    "weight_decay": 1e-4, "loss": "structure", "epochs": 100, "augment": "basic", "early_stop_patience": 10,
    "max_train_items": None, "amp": True, "channels_last": True,
}
PRANET_FULL = {"train": 1318, "val": 149}  # data/splits.json of the PraNet protocol (seed 42), used without it


def paper_data(params: Any | None, items: int | None, seed: int) -> tuple[ImageSet, ImageSet, dict]:
    """Train/val subsets of the PraNet split at 352 px from the project's cache, else synthetic arrays."""
    rng = np.random.default_rng(seed)
    try:
        from polypflow.pipeline import read_facts, read_splits

        if params is None:
            raise FileNotFoundError("no usable params.yaml")
        splits, facts = read_splits(params), read_facts(params)
        full = {"train": len(splits["train"]), "val": len(splits["val"])}
        n_train = min(items or full["train"], full["train"])
        n_val = max(1, round(n_train * full["val"] / full["train"]))
        keys = {k: sorted(rng.choice(splits[k], size=n, replace=False).tolist())
                for k, n in (("train", n_train), ("val", n_val))}
        load = lambda k: load_image_set(facts, k, 352, params.validate_.mask_threshold, params.paths.cache)  # noqa: E731
        return load(keys["train"]), load(keys["val"]), {"data": f"real: {params.paths.splits} ({splits['scheme']})", **full}
    except Exception as exc:  # no params/splits/raw files on this machine: the timing does not depend on pixels
        full = dict(PRANET_FULL)
        n_train = min(items or full["train"], full["train"])
        n_val = max(1, round(n_train * full["val"] / full["train"]))
        make = lambda n: ImageSet([f"s/{i}" for i in range(n)],  # noqa: E731
                                  rng.integers(0, 256, (n, 352, 352, 3), dtype=np.uint8),
                                  (rng.random((n, 352, 352)) > 0.7).astype(np.uint8))
        return make(n_train), make(n_val), {"data": f"synthetic ({failure(exc)[8:120]})", **full}


def bench_paper(params: Any | None, epochs: int, items: int | None, setup: Setup) -> dict:
    """Time ``epochs`` epochs of IC-PolypSeg-EF0 through ``polypflow.training.fit``; extrapolate to 100."""
    from polypflow.config import Recipe
    from polypflow.training import fit

    start = time.perf_counter()
    train, val, report = paper_data(params, items, seed=42)
    report["data_load_s"] = time.perf_counter() - start
    defaults = params.train.defaults.model_dump() if params is not None else {"normalize": "imagenet", "scheduler": "cosine"}
    recipe = Recipe.model_validate({**defaults, **PAPER_IC_POLYPSEG_RECIPE, "epochs": epochs})
    marks = [time.perf_counter()]
    torch.manual_seed(0)
    model = build_model("ic_polypseg", **PAPER_IC_POLYPSEG_MODEL)
    fit(model, recipe, train, val, setup.device, setup.workdir / "paper-checkpoint.pt", seed=42,
        on_epoch=lambda epoch, metrics: marks.append(time.perf_counter()))
    epoch_s = np.diff(marks).tolist()
    scale = report["train"] / len(train.keys)
    steady = epoch_s[-1] if len(epoch_s) > 1 else epoch_s[0]
    report.update(model=PAPER_IC_POLYPSEG_MODEL, recipe=PAPER_IC_POLYPSEG_RECIPE, epochs_timed=epochs,
                  train_items_timed=len(train.keys), val_items_timed=len(val.keys), epoch_s=epoch_s,
                  full_epoch_s_estimate=steady * scale,
                  extrapolated_100_epochs_min=steady * scale * PAPER_IC_POLYPSEG_RECIPE["epochs"] / 60,
                  method_of_extrapolation="last timed epoch (train subset + proportional val subset + checkpoint) "
                                          f"x {scale:.1f} (full train / timed train) x 100 epochs; no early stop")
    return report
