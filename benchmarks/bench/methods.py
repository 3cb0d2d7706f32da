"""Which settings build and train a registered architecture in the benchmark.

The benchmark names registered architectures (``unet``, ``ic_polypseg``); the project configures entries
(``methods:`` of methods.yaml, ``ic_polypseg_ef0`` with ``arch: ic_polypseg``). An architecture is built with
the kwargs of the entry that configures it and trained with that entry's recipe (:meth:`Params.recipe`), so
the loss, optimiser, AMP and channels-last of a training row are those the trainer would use.
"""

from __future__ import annotations

from typing import Any

from models import method_entry
from polypflow.settings.config import Recipe

# Without a usable params.yaml: AdamW + bce_dice, everything else the Recipe's own defaults (AMP, channels-last)
FALLBACK_RECIPE = {"epochs": 1, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-2, "scheduler": "none",
                   "loss": "bce_dice", "augment": "none", "normalize": "imagenet", "early_stop_patience": 1}


def configuring_entry(method: str, params: Any | None) -> str | None:
    """The ``methods:`` entry that configures architecture ``method``: the entry of that name when its arch is
    itself, else the first entry whose arch is ``method``; None without params or such an entry."""
    if params is None:
        return None
    specs = params.methods
    if method in specs and (specs[method].arch or method) == method:
        return method
    return next((name for name, spec in specs.items() if (spec.arch or name) == method), None)


def method_kwargs(method: str, params: Any | None, quick: bool) -> dict:
    """Builder kwargs: tiny test variant (quick), else the configuring entry's, else registry defaults;
    always ``pretrained="none"`` (the timing does not depend on the weights)."""
    if quick:
        return {"pretrained": "none", **method_entry(method).test_kwargs}
    entry = configuring_entry(method, params)
    return {**params.methods[entry].model, "pretrained": "none"} if entry else {"pretrained": "none"}


def method_recipe(method: str, params: Any | None, size: int, batch: int) -> tuple[Recipe, str]:
    """The recipe the trainer would train ``method`` with, at the benchmark's size and batch, and where it came
    from: ``methods.<entry>``, ``train.defaults`` (no entry configures it) or ``fallback`` (no params)."""
    at = {"image_size": size, "batch_size": batch}
    entry = configuring_entry(method, params)
    if entry is not None:
        return Recipe.model_validate({**params.recipe(entry).model_dump(), **at}), f"methods.{entry}"
    if params is not None:
        return Recipe.model_validate({**params.train.defaults.model_dump(), **at}), "train.defaults"
    return Recipe.model_validate({**FALLBACK_RECIPE, **at}), "fallback"
