"""Speed: each method's deployable graph at each batch through the benchmark's own back-ends
(:func:`benchmarks.bench.inference.bench_method`): eager fp32, bf16 autocast with channels-last, ``torch.compile``,
and ONNX Runtime's CUDA and TensorRT providers where this onnxruntime has them ("not available" rows otherwise).

The cheap back-ends of every method come first, then ``torch.compile`` (its compile time is each row's
``first_call_s``), then ONNX Runtime; a group whose reserve no longer fits before the deadline is recorded as
skipped, so a run never overruns its command's limit for a row it cannot finish.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import onnxruntime as ort

from benchmarks.bench.common import Setup, failure
from benchmarks.bench.inference import add_ratios, bench_method, ort_variants

# (group, back-ends of benchmarks.bench.inference, seconds a method needs before the deadline to start it)
GROUPS = (("torch", ("eager_fp32", "amp_channels_last"), 20.0),
          ("compile", ("compile",), 100.0),
          ("ort", ("ort_cuda", "ort_cuda_fp16", "ort_tensorrt_fp16"), 90.0))


def offered(setup: Setup) -> set[str]:
    """The GPU ONNX Runtime back-ends this onnxruntime and device offer."""
    return set(ort_variants(ort.get_available_providers(), setup.device.type == "cuda", setup.workdir / "trt"))


def absent_rows(method: str, backends: Sequence[str], batches: Sequence[int], status: str) -> list[dict]:
    return [{"method": method, "backend": b, "batch": n, "status": status} for b in backends for n in batches]


def bench_speed(methods: Sequence[str], kwargs_of: Callable[[str], dict], size: int, batches: Sequence[int],
                setup: Setup, deadline: float, ceiling_tflops: float | None, skip: dict[str, str],
                saved: Callable[[dict], None]) -> dict:
    """``{"models": [...], "rows": [...]}``, handed to ``saved`` after each (group, method)."""
    result: dict = {"models": [], "rows": []}
    have = offered(setup)
    for group, backends, reserve in GROUPS:
        for method in methods:
            left = deadline - time.perf_counter()
            wanted = [b for b in backends if group != "ort" or b in have]
            if group in skip:
                rows = absent_rows(method, backends, batches, f"skipped: {skip[group]}")
            elif not wanted:
                rows = absent_rows(method, backends, batches, "not available: onnxruntime has no GPU provider here "
                                   "(CPU build of onnxruntime, or no CUDA device)")
            elif left < reserve:
                rows = absent_rows(method, backends, batches, f"skipped: {left:.0f} s left before the deadline, "
                                   f"{reserve:.0f} s reserved for {group}")
            else:
                rows = measure(method, kwargs_of, size, batches, dataclasses.replace(setup, backends=wanted),
                               ceiling_tflops, result["models"])
                rows += absent_rows(method, [b for b in backends if b not in wanted], batches, "not available: "
                                    "this onnxruntime lacks the provider")
            result["rows"] += rows
            for m in methods:
                add_ratios([r for r in result["rows"] if r["method"] == m],
                           next((i["ceiling_fps"] for i in result["models"] if i["method"] == m), None))
            saved(result)
    return result


def measure(method: str, kwargs_of: Callable[[str], dict], size: int, batches: Sequence[int], setup: Setup,
            ceiling_tflops: float | None, models: list[dict]) -> list[dict]:
    """The benchmark's rows of ``method`` for ``setup.backends``; its model facts once into ``models``."""
    try:
        info, rows = bench_method(method, kwargs_of(method), size, batches, setup, ceiling_tflops, None)
    except Exception as exc:  # the model cannot be built or counted
        return absent_rows(method, setup.backends, batches, failure(exc))
    if not any(m["method"] == method for m in models):
        models.append(info)
    return rows
