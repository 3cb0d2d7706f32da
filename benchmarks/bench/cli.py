"""Speed side by side on the device present: inference back-ends, training, data loading, paper timing.

    python -m benchmarks.bench [--methods ...] [--image-size 352] [--batches 1 16 64] [--iterations N]
                               [--out DIR] [--quick] [--paper-ic-polypseg]

Writes ``bench.json`` and ``bench.md`` to ``--out`` (rewritten after every section, so a run stopped
early keeps what it measured) and prints the Markdown. Every measurement that fails is recorded as
``"failed: <reason>"`` and the run goes on. Conventions: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench.common import Setup, failure
from benchmarks.bench.device import device_info, probe_device
from benchmarks.bench.inference import bench_method
from benchmarks.bench.loading import bench_data, keeps_up
from benchmarks.bench.methods import method_kwargs, method_recipe
from benchmarks.bench.paper import PAPER_PROFILE, bench_paper
from benchmarks.bench.report import markdown, write
from benchmarks.bench.throughput import bench_training
from models import list_methods
from polypflow.infer.device import resolve_device


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", help="registered methods (default: all)")
    p.add_argument("--image-size", type=int, default=352)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="inference batch sizes")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("artifacts/benchmarks"))
    p.add_argument("--quick", action="store_true",
                   help="tiny test variants of the models, 1 warm-up, short probes, synthetic-sized data subset")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="method configs and paths (optional)")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--backends", nargs="+", default=["eager_fp32", "fp32_channels_last", "amp_channels_last", "compile", "ort"],
                   help="eager_fp32 fp32_channels_last amp_channels_last compile ort (ort = every ort_* variant) "
                        "or single ort_* names")
    p.add_argument("--skip-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--compile-mode", help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"], default="auto", help="auto: bf16")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--train-methods", nargs="+", help="default: --methods")
    p.add_argument("--train-batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/Kvasir-SEG"),
                   help="images/ + masks/ folder; synthetic JPEGs when absent")
    p.add_argument("--data-items", type=int, default=64)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--paper-ic-polypseg", action="store_true", help="time IC-PolypSeg-EF0 paper training (only this, "
                   "unless other sections are asked for with --with-sections)")
    p.add_argument("--paper-profile", type=Path, default=PAPER_PROFILE,
                   help="the profile whose methods.ic_polypseg_ef0 the paper timing trains")
    p.add_argument("--paper-epochs", type=int, default=1)
    p.add_argument("--paper-items", type=int, help="train images timed per epoch (default: all on CUDA, 32 on CPU)")
    p.add_argument("--with-sections", action="store_true", help="with --paper-ic-polypseg, also run the other sections")
    return p.parse_args(argv)


def make_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    try:
        device = resolve_device(args.device)  # the trainer's rule: auto = CUDA when present
    except RuntimeError:
        raise SystemExit("--device cuda, but no CUDA device is available") from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
    backends = [b for b in args.backends if not (args.skip_compile and b == "compile")]
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    warmup, iterations = (1, min(args.iterations, 2)) if args.quick else (args.warmup, args.iterations)
    return Setup(device, amp, warmup, iterations, mode, workdir, args.quick, backends)


def load_project_params(path: Path) -> Any | None:
    from polypflow.settings.config import load_params

    try:
        return load_params(path)
    except Exception as exc:
        print(f"note: {path} not used ({failure(exc)[8:]}); registry defaults apply", file=sys.stderr)
        return None


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the requested sections; return the result written to ``--out``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_project_params(args.params)
    with tempfile.TemporaryDirectory(prefix="polypflow-bench-") as tmp:
        setup = make_setup(args, Path(tmp))
        command = " ".join(["python -m benchmarks.bench", *(argv if argv is not None else sys.argv[1:])])
        result: dict[str, Any] = {"meta": {
            **device_info(setup.device), "command": command, "amp_dtype": str(setup.amp_dtype)[6:],
            "warmup": setup.warmup, "iterations": setup.iterations, "quick": args.quick, "image_size": args.image_size,
            "backends": list(setup.backends), "compile_mode": setup.compile_mode}}
        only_paper = args.paper_ic_polypseg and not args.with_sections
        if not only_paper:
            run_sections(args, params, setup, result)
        if args.paper_ic_polypseg:
            items = args.paper_items or (None if setup.device.type == "cuda" else 32)
            print(f"paper profile: IC-PolypSeg-EF0 from {args.paper_profile} ...", flush=True)
            try:
                result["paper_ic_polypseg"] = bench_paper(params, args.paper_profile, args.paper_epochs, items, setup)
            except Exception as exc:
                result["paper_ic_polypseg"] = {"status": failure(exc)}
        write(result, args.out)
    print(markdown(result))
    return result


def run_sections(args: argparse.Namespace, params: Any | None, setup: Setup, result: dict) -> None:
    methods = args.methods or list_methods("segmentation")  # the benchmark times segmenters only
    kwargs_of = lambda m: method_kwargs(m, params, args.quick)  # noqa: E731
    print("GEMM probe ...", flush=True)
    result["probe"] = probe_device(setup)
    write(result, args.out)
    if not args.skip_inference:
        result["models"], result["inference"] = [], []
        for method in methods:
            try:
                info, rows = bench_method(method, kwargs_of(method), args.image_size, args.batches, setup,
                                          result["probe"]["peak_tflops"], args.threads)
            except Exception as exc:  # the model itself cannot be built or counted
                info, rows = {"method": method, "status": failure(exc)}, []
            if "macs" in info:
                result["models"].append(info)
            else:
                result["inference"].append({"method": method, "backend": "build", "batch": 0, "status": info["status"]})
            result["inference"] += rows
            write(result, args.out)
    if not args.skip_train:
        recipe_of = lambda m, batch: method_recipe(m, params, args.image_size, batch)  # noqa: E731
        batches = [2] if args.quick else args.train_batches
        result["training"] = bench_training(args.train_methods or methods, kwargs_of, recipe_of, args.image_size,
                                            batches, setup)
        write(result, args.out)
    if not args.skip_data:
        n = min(args.data_items, 8) if args.quick else args.data_items
        workers = [0] if args.quick else args.loader_workers
        result["data"] = bench_data(args.data_root, n, args.image_size, 16, workers, setup)
        result["data"]["keeps_up"] = keeps_up(result["data"], result.get("training", []))
        write(result, args.out)
