"""The GPU run: train for real, evaluate, time inference; one command, within one device call.

    python -m benchmarks.gpu_run --minutes 6 --out DIR [--bundle gpu_bundle] [--deadline-minutes 9]
    python -m benchmarks.gpu_run --device cpu --smoke --minutes 0.5 --out DIR --bundle SMALL_BUNDLE

Sections, each written to ``DIR/gpu_run.json`` and ``DIR/gpu_run.md`` as soon as it ends: training (``--minutes``
of wall time; :mod:`benchmarks.gpu_run.train`), evaluation on every test set of the bundle, speed
(:mod:`benchmarks.gpu_run.speed`) until ``--deadline-minutes`` after the start. ``--smoke`` runs the same code on
the CPU: the bundle's (small) images, a few steps, the registry's tiny variants of two methods, no compile.
The data, the wheels and the weights travel in the bundle (:mod:`benchmarks.gpu_run.bundle`); benchmarks/README.md,
"GPU run", has the device command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench.common import Setup, failure
from benchmarks.bench.device import device_info, probe_device
from benchmarks.bench.methods import method_kwargs
from benchmarks.gpu_run.bundle import DEFAULT_BUNDLE, BundleError, image_set, open_bundle
from benchmarks.gpu_run.report import markdown, write
from benchmarks.gpu_run.speed import bench_speed
from benchmarks.gpu_run.train import evaluate, loader_and_step, published, train, train_settings
from models.encoders import OFFLINE_WEIGHTS
from polypflow.infer.device import resolve_device
from polypflow.settings.config import ParamsError, load_params

SMOKE_METHODS, SMOKE_BATCHES = ["ic_polypseg", "fcn"], [1, 2]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="training wall time")
    p.add_argument("--deadline-minutes", type=float, default=9.0,
                   help="the whole run, from its start: speed rows that would end later are skipped")
    p.add_argument("--out", type=Path, required=True, help="gpu_run.json and gpu_run.md go here")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="made by python -m benchmarks.gpu_run.bundle")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--methods", nargs="+", default=["ic_polypseg", "unet", "fcn", "pranet"], help="speed section")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="speed section")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="CPU check: small steps, tiny models, no compile")
    return p.parse_args(argv)


def imported_distributions() -> list[str]:
    """The installed distributions this process imported (the project's own left out)."""
    owners = importlib.metadata.packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    names = {d.lower().replace("_", "-") for top in tops for d in owners.get(top, [])}
    return sorted(names - {"polypflow"})


def train_and_test(args: argparse.Namespace, params: Any, bundle: tuple[dict, Any], setup: Setup, result: dict,
                   save: Any) -> None:
    """Training (into ``result["training"]``), then the test sets (``result["test"]``)."""
    meta, zf = bundle
    settings = train_settings(params, meta["image_size"], args.smoke)
    start = time.perf_counter()
    train_set, val_set = image_set(zf, meta["train"]), image_set(zf, meta["val"])
    decode_s = time.perf_counter() - start
    speeds = loader_and_step(settings, train_set, setup)
    encoder = settings.kwargs.get("encoder")
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS[encoder]) if encoder in OFFLINE_WEIGHTS else None
    model, fit, report = train(settings, train_set, val_set, params, setup.device, setup.workdir, args.minutes)
    n = len(train_set.keys)
    result["training"] = {**report, "recipe": settings.recipe.model_dump(), "decode_s": decode_s, "speeds": speeds,
                          "settings": {"arch": settings.arch, "model": settings.kwargs, "source": settings.source,
                                       "weights": spec.origin if spec else None},
                          "per_epoch": {"measured_s": float(np.median(report["epoch_s"])),
                                        "loader_s": n / speeds["loader_images_per_s"] if "loader_images_per_s" in speeds else None,
                                        "step_s": n / speeds["step_images_per_s"] if "step_images_per_s" in speeds else None}}
    save()
    result["test"] = evaluate(model, settings.recipe, fit.threshold, zf, meta["test"], params, setup.device,
                              setup.workdir)
    save()


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the sections; return what was written to ``--out``."""
    start = time.perf_counter()
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        params = load_params(args.params)
        bundle = open_bundle(args.bundle)
    except (ValueError, ParamsError, BundleError) as exc:
        raise SystemExit(f"gpu_run: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per scale: let cuDNN pick its kernels
    deadline = start + 60 * args.deadline_minutes
    warmup, iterations = (1, 2) if args.smoke else (args.warmup, args.iterations)
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as tmp:
        setup = Setup(device, torch.bfloat16, warmup, iterations, "reduce-overhead" if device.type == "cuda" else "default",
                      Path(tmp), quick=args.smoke)
        command = " ".join(["python -m benchmarks.gpu_run", *(argv if argv is not None else sys.argv[1:])])
        result: dict[str, Any] = {
            "meta": {**device_info(device), "command": command, "deadline_s": 60 * args.deadline_minutes,
                     "minutes": args.minutes, "smoke": args.smoke, "bundle": {k: v if not isinstance(v, (list, dict))
                                                                             else len(v) for k, v in bundle[0].items()}},
            "published_pranet": published(params)}

        def save() -> None:
            result["meta"]["elapsed_s"] = time.perf_counter() - start
            result["meta"]["distributions"] = imported_distributions()
            write(result, args.out)

        save()
        if not args.skip_train:
            try:
                train_and_test(args, params, bundle, setup, result, save)
            except Exception as exc:  # recorded; the speed section still runs
                result.setdefault("training", {})["status"] = failure(exc)
                save()
        if not args.skip_speed:
            speed(args, params, bundle[0]["image_size"], setup, deadline, result, save)
    print(markdown(result))
    return result


def speed(args: argparse.Namespace, params: Any, size: int, setup: Setup, deadline: float, result: dict,
          save: Any) -> None:
    """The GEMM probe (the ceiling each row is compared with), then the speed rows at ``size`` (the bundle's, the
    paper profile's input size)."""
    result["probe"] = probe_device(setup)
    save()
    methods, batches = (SMOKE_METHODS, SMOKE_BATCHES) if args.smoke else (args.methods, args.batches)
    skip = {"compile": "--smoke (compiling takes minutes on a CPU)"} if args.smoke else {}

    def saved(speed_result: dict) -> None:
        result["speed"] = {**speed_result, "image_size": size, "warmup": setup.warmup, "iterations": setup.iterations,
                           "compile_mode": setup.compile_mode}
        save()

    bench_speed(methods, lambda m: method_kwargs(m, params, args.smoke), size, batches, setup, deadline,
                result["probe"]["peak_tflops"], skip, saved)
