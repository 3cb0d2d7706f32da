"""Model cost: parameters, MACs (torch.utils.flop_counter) and latency for PyTorch and ONNX Runtime."""

from __future__ import annotations

import platform

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polypflow.infer.onnx import onnx_session


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2, as papers report "MACs")."""
    model = model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(batch, 3, image_size, image_size, device=next(model.parameters()).device))
    return counter.get_total_flops() // 2


def latency(fn: Callable[[], object], warmup: int, iterations: int, sync: Callable[[], None] = lambda: None) -> dict:
    """p50/p95/mean latency in milliseconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)), "mean_ms": float(t.mean())}


def torch_latency(model: nn.Module, image_size: int, batch: int, warmup: int, iterations: int, device: torch.device) -> dict:
    model = model.eval().to(device)
    x = torch.rand(batch, 3, image_size, image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.no_grad():
            model(x)

    stats = latency(step, warmup, iterations, sync)
    return {**stats, "fps": 1e3 * batch / stats["p50_ms"]}


def ort_latency(session, image_size: int, batch: int, warmup: int, iterations: int) -> dict:
    x = np.random.default_rng(0).random((batch, 3, image_size, image_size), dtype=np.float32)
    name = session.get_inputs()[0].name
    stats = latency(lambda: session.run(None, {name: x}), warmup, iterations)
    return {**stats, "fps": 1e3 * batch / stats["p50_ms"], "providers": session.get_providers()}


def ort_grid(graphs: Mapping[int, Mapping[str, Path]], threads: Sequence[int], batch: int, warmup: int,
             iterations: int, graph: str = "shipped") -> list[dict]:
    """ONNX Runtime latency of each graph (input size -> precision -> ONNX file) with each intra-op thread count:
    one row per (precision, size, threads) with p50/p95 ms and FPS, labelled ``graph`` (``shipped``, or ``plain``:
    the network of a model shipped with test-time augmentation, without it)."""
    rows = []
    for size, files in graphs.items():
        for precision, path in files.items():
            for n in threads:
                stats = ort_latency(onnx_session(path, n), size, batch, warmup, iterations)
                rows.append({"graph": graph, "precision": precision, "size": size, "threads": n, "batch": batch,
                             "p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"], "fps": stats["fps"]})
    return rows


def grid_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The grid's rows as flat MLflow metric names, e.g. ``ort_int8_352px_2t_fps`` (the shipped graph) and
    ``ort_plain_int8_352px_2t_fps``."""
    def name(r: dict) -> str:
        graph = "" if r.get("graph", "shipped") == "shipped" else f"{r['graph']}_"
        return f"ort_{graph}{r['precision']}_{r['size']}px_{r['threads']}t"
    return {f"{name(r)}_{k}": r[k] for r in rows for k in ("p50_ms", "fps")}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"
