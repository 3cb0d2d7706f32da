"""The device: what it is (names, versions, threads) and what it can do (a large-GEMM probe of achievable FLOP/s,
the ceiling that inference FPS is compared with: ceiling FPS = probe FLOP/s / (2 × MACs per image))."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench.common import Setup, failure


def device_info(device: torch.device) -> dict:
    import onnxruntime as ort

    info = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine()), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_name"] = line.split(":", 1)[1].strip()
                info["device_name"] = info["device_name"] if device.type == "cuda" else info["cpu_name"]
                break
    return info


def gemm_probe(device: torch.device, dtype: torch.dtype, n: int, min_seconds: float = 0.5) -> dict:
    """Achievable matmul FLOP/s: the best of several windows of square n×n GEMMs over ``min_seconds``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    rates, begin = [], time.perf_counter()
    while time.perf_counter() - begin < min_seconds or len(rates) < 3:  # best window: least disturbed by neighbours
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 5 or reps < 1:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 10 == 0:
                sync()
        sync()
        rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "windows": len(rates), "tflops": max(rates),
            "tflops_median": float(np.median(rates))}


def probe_device(setup: Setup) -> dict:
    n = 512 if setup.quick else (8192 if setup.device.type == "cuda" else 2048)
    probes = {}
    for name, dtype in (("fp32", torch.float32), ("amp", setup.amp_dtype)):
        try:
            probes[name] = gemm_probe(setup.device, dtype, n, 0.2 if setup.quick else 1.0)
        except Exception as exc:  # e.g. a dtype without matmul kernels on this device
            probes[name] = {"dtype": str(dtype), "status": failure(exc)}
    flops = [p["tflops"] for p in probes.values() if "tflops" in p]
    probes["peak_tflops"] = max(flops) if flops else None
    return probes
