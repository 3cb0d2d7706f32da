"""Training throughput: images/s of the trainer's own step (:func:`polypflow.train.engine.train_step`) on a model
placed as :func:`polypflow.train.engine.fit` places it, with the method's recipe (optimiser, loss, AMP where
:func:`polypflow.train.engine.amp_enabled` turns it on, channels-last as the recipe says).

Images/s = batch / mean step time, at one fixed size (a row per size; the recipe's multiscale is not drawn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from benchmarks.bench.common import Setup, failure
from models import build_model
from polypflow.settings.config import Recipe
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.evaluate.profiling import latency
from polypflow.infer.device import amp_enabled
from polypflow.train.engine import make_optimizer, train_step


def train_throughput(method: str, kwargs: dict, recipe: Recipe, size: int, batch: int, setup: Setup) -> dict:
    """Step-time statistics and images/s of ``batch`` random ``size``² images through the trainer's step."""
    device, amp = setup.device, amp_enabled(recipe, setup.device)
    torch.manual_seed(0)
    model = build_model(method, **kwargs).to(device).train()
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    task = SegmentationTask(None, recipe)  # training needs only the recipe
    optimizer = make_optimizer(model, recipe)
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.7).float()
    stats = latency(lambda: train_step(model, x, y, task, optimizer, recipe.channels_last, amp, epoch=0),
                    setup.warmup, setup.iterations, setup.sync)
    return {**stats, "images_per_s": 1e3 * batch / stats["mean_ms"], "amp": "bf16" if amp else "off",
            "channels_last": recipe.channels_last, "optimizer": recipe.optimizer, "loss": recipe.loss}


def bench_training(methods: Sequence[str], kwargs_of: Callable[[str], dict],
                   recipe_of: Callable[[str, int], tuple[Recipe, str]], size: int, batches: Sequence[int],
                   setup: Setup) -> list[dict]:
    """One row per (method, batch); ``recipe_of(method, batch)`` gives the recipe and where it came from."""
    rows = []
    for method in methods:
        for batch in batches:
            row = {"method": method, "batch": batch, "image_size": size, "status": "ok"}
            try:
                recipe, row["recipe"] = recipe_of(method, batch)
                row.update(train_throughput(method, kwargs_of(method), recipe, size, batch, setup))
            except Exception as exc:  # out of memory included
                row["status"] = failure(exc)
            rows.append(row)
            print(f"  train {method:>14} b{batch:<3} {row.get('images_per_s', float('nan')):8.2f} img/s  {row['status'][:80]}",
                  flush=True)
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
