"""Ablations of the CPU-best recipe, one lever at a time, on validation only (issue 23).

    python -m benchmarks.cpu_recipe --name ema --epochs 4 --set ema_decay=0.998

trains ``--method`` (default the profile's first) with ``profiles/<--profile>.yaml`` over the workspace's settings,
``--set`` recipe keys and ``--model`` builder keys (YAML values) over that, through the project's own plan and
trainer (:func:`polypflow.tasks.plan.fit_plan`, same seed, the split's own train/val keys), and scores the weights
it selects on the validation images: Dice at 0.5 plain and with flip test-time augmentation (``models.tta``), and
the threshold grid's curve (read, not chosen from: a threshold picked on these 151 images would be scored on
them). Writes ``<--out>/<name>.json`` (atomically) with the per-epoch history (the raw weights' val Dice beside
the EMA's when the recipe averages), each epoch's wall time and the figures, and prints one table row.
Train one at a time on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from models.tta import plain, with_tta
from polypflow.data.images import load_image_set, read_facts, read_splits
from polypflow.evaluate.profiling import device_name
from polypflow.infer.device import CPU
from polypflow.io import write_json
from polypflow.settings.config import DEFAULT_PARAMS, Params, ParamsError, describe, read_settings
from polypflow.settings.profiles import deep_merge, read_profile
from polypflow.tasks.plan import fit_plan, plan_method
from polypflow.tasks.segmentation import THRESHOLD_GRID, grid_dice, predict_probs


def assignments(pairs: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {pair!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def settings(params_path: Path, profile: str, method: str | None, recipe: dict, model: dict) -> tuple[Params, str]:
    data, _ = read_settings(params_path)
    merged = deep_merge(data, read_profile(params_path.parent / "profiles", profile))
    method = method or merged["train"]["methods"][0]
    spec = merged["methods"][method]
    spec["recipe"] = {**spec.get("recipe", {}), **recipe}
    spec["model"] = {**spec.get("model", {}), **model}
    try:
        return Params.model_validate(merged), method
    except ValidationError as exc:
        raise ParamsError(f"{params_path} with profile {profile} and the overrides: {describe(exc)}") from exc


def val_figures(model, params: Params, plan) -> dict[str, Any]:
    """Dice at 0.5 and over the threshold grid on the validation images, without and with flip TTA."""
    val = load_image_set(read_facts(params), plan.val_keys, plan.recipe.image_size, params.validate_.mask_threshold,
                         params.paths.cache)
    net = plain(model)
    out = {}
    for tta in ("none", "hflip", "hvflip"):
        start = time.perf_counter()
        probs = predict_probs(with_tta(net, tta), val.images, plan.recipe.normalize, CPU)
        curve = grid_dice(probs, val.masks)
        out[tta] = {"dice_0.5": float(curve[np.flatnonzero(THRESHOLD_GRID == 0.5)[0]]),
                    "best_threshold": float(THRESHOLD_GRID[int(np.argmax(curve))]), "dice_best": float(curve.max()),
                    "curve": dict(zip(map(float, THRESHOLD_GRID), map(float, curve))),
                    "seconds": time.perf_counter() - start}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--profile", default="cpu-best")
    ap.add_argument("--method")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--set", action="append", default=[], help="recipe key=value (YAML), e.g. ema_decay=0.998")
    ap.add_argument("--model", action="append", default=[],
                    help="builder key=value (YAML), e.g. encoder=tf_efficientnet_lite1")
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    ap.add_argument("--out", type=Path, default=Path("artifacts/benchmarks/cpu_recipe"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    recipe = {**assignments(args.set, "--set"), "epochs": args.epochs}
    params, method = settings(args.params, args.profile, args.method, recipe, assignments(args.model, "--model"))
    splits = read_splits(params)
    plan = plan_method(params, method, splits["train"], splits["val"])
    marks = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as tmp:
        model, result = fit_plan(params, plan, Path(tmp) / "checkpoint.pt", resume=False,
                                 on_epoch=lambda epoch, metrics: marks.append(time.perf_counter()))
    train_s = marks[-1] - marks[0]
    figures = val_figures(model, params, plan)
    record = {"name": args.name, "profile": args.profile, "method": method, "arch": plan.arch, "model": plan.kwargs,
              "recipe": plan.recipe.model_dump(),
              "overrides": {"recipe": recipe, "model": assignments(args.model, "--model")},
              "train_images": len(plan.train_keys), "val_images": len(plan.val_keys),
              "cpu": device_name(CPU), "train_s": train_s, "epoch_s": np.diff(marks).tolist(),
              "best_epoch": result.best_epoch, "selected_val_dice": result.best_score, "history": result.history,
              "val": figures}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", record)
    v = figures
    print(f"| {args.name} | {v['none']['dice_0.5']:.4f} | {v['hflip']['dice_0.5']:.4f} | {v['hvflip']['dice_0.5']:.4f} "
          f"| {v['none']['dice_best']:.4f} @ {v['none']['best_threshold']:.2f} | epoch {result.best_epoch} "
          f"| {train_s / 60:.1f} min |", flush=True)


if __name__ == "__main__":
    main()
