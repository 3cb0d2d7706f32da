"""Speed side by side on the device present: inference back-ends, training, data loading, paper timing.

    python -m benchmarks.bench [--methods ...] [--image-size 352] [--batches 1 16 64] [--iterations N]
                               [--out DIR] [--quick] [--paper-ic-polypseg]

Writes ``bench.json`` and ``bench.md`` to ``--out`` (rewritten after every section, so a run stopped
early keeps what it measured) and prints the Markdown. Every measurement that fails is recorded as
``"failed: <reason>"`` and the run goes on. Conventions (see benchmarks/README.md):

- Inference times the deployable graph (:class:`ProbabilityHead`: normalisation + model + sigmoid of
  the main map) in every back-end, so PyTorch and ONNX Runtime do the same work. Latency is per batch;
  FPS = batch / p50.
- Training images/s = batch / mean step time (forward + loss + backward + AdamW step), fp32 on CPU and
  bf16 autocast + channels-last on CUDA, as ``polypflow.training`` trains.
- The ceiling is MACs-based: a large-GEMM probe measures the device's achievable FLOP/s; ceiling FPS =
  probe FLOP/s / (2 * MACs per image).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import build_model, list_methods, method_entry
from polypflow.data import (NORMALIZATION, ImageSet, SegDataset, augmentation, load_image_set, read_image, read_mask,
                            to_tensor)
from polypflow.losses import build_loss
from polypflow.onnx_export import ProbabilityHead, export_onnx
from polypflow.profiling import count_macs, count_params, latency
from polypflow.training import bf16_pays

MEAN, STD = NORMALIZATION["imagenet"]
TARGETS = {
    "ef0_fps_batch1_h100": 1000.0,
    "ef0_speedup_vs_eager_h100": 3.0,
    "ort_cpu_latency_vs_eager_cpu": 0.5,
    "paper_training_minutes_h100": 10.0,
}
# IC-PolypSeg on the PraNet protocol (METHODS.md section 1): the recipe timed by --paper-ic-polypseg
PAPER_IC_POLYPSEG_MODEL = {"encoder": "efficientnet_b0", "pretrained": "none"}
PAPER_IC_POLYPSEG_RECIPE = {
    "image_size": 352, "batch_size": 16, "multiscale": [0.75, 1.0, 1.25], "optimizer": "adamw", "lr": 1e-4,
    "weight_decay": 1e-4, "loss": "structure", "epochs": 100, "augment": "basic", "early_stop_patience": 10,
    "max_train_items": None, "amp": True, "channels_last": True,
}
PRANET_FULL = {"train": 1318, "val": 149}  # data/splits.json of the PraNet protocol (seed 42), used without it


@dataclass
class Setup:
    """Everything a measurement needs to know about the run."""

    device: torch.device
    amp_dtype: torch.dtype
    warmup: int
    iterations: int
    compile_mode: str
    workdir: Path
    quick: bool = False
    backends: Sequence[str] = ()
    notes: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], batch: int) -> dict:
        stats = latency(fn, self.warmup, self.iterations, self.sync)
        return {**stats, "fps": 1e3 * batch / stats["p50_ms"]}


def failure(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"failed: {text[:300]}"


# ---------------------------------------------------------------- device and GEMM probe


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


# ---------------------------------------------------------------- models


def method_kwargs(method: str, params: Any | None, quick: bool) -> dict:
    """Builder kwargs: tiny test variant (quick), else params.yaml ``methods:``, else registry defaults."""
    if quick:
        return {"pretrained": "none", **method_entry(method).test_kwargs}
    if params is not None:
        specs = params.methods
        match = specs.get(method) if method in specs and (specs[method].arch or method) == method else None
        match = match or next((s for k, s in specs.items() if (s.arch or k) == method), None)
        if match is not None:
            return {**match.model, "pretrained": "none"}
    return {"pretrained": "none"}


def deployable(method: str, kwargs: dict) -> ProbabilityHead:
    torch.manual_seed(0)
    return ProbabilityHead(build_model(method, **kwargs), MEAN, STD).eval()


def no_grad_call(head: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return head(x)

    return call


# ---------------------------------------------------------------- inference back-ends


def torch_backends(head: ProbabilityHead, setup: Setup) -> dict[str, Callable[[int, int], dict]]:
    """Back-end name -> measure(batch, size) for the PyTorch variants."""
    device = setup.device
    eager = head.to(device)
    fast = copy.deepcopy(head).to(device, memory_format=torch.channels_last)
    compiled: dict[str, nn.Module] = {}

    def run_eager(batch: int, size: int) -> dict:
        return setup.timed(no_grad_call(eager, torch.rand(batch, 3, size, size, device=device)), batch)

    def run_channels_last(batch: int, size: int) -> dict:
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        return setup.timed(no_grad_call(fast, x), batch)

    def run_amp(batch: int, size: int) -> dict:
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        return setup.timed(no_grad_call(fast, x, setup.amp_dtype), batch)

    def run_compile(batch: int, size: int) -> dict:
        if "model" not in compiled:
            compiled["model"] = torch.compile(fast, mode=setup.compile_mode)
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        call = no_grad_call(compiled["model"], x, setup.amp_dtype)
        start = time.perf_counter()
        call()  # compiles (again for each new batch size)
        setup.sync()
        first_s = time.perf_counter() - start
        return {**setup.timed(call, batch), "first_call_s": first_s, "mode": setup.compile_mode}

    return {"eager_fp32": run_eager, "fp32_channels_last": run_channels_last, "amp_channels_last": run_amp,
            "compile": run_compile}


def fp16_onnx(src: Path, dst: Path) -> Path:
    """fp16 weights and activations with fp32 inputs/outputs (keep_io_types), by the converter that ships
    inside onnxruntime (``onnxruntime.transformers.float16``, no onnxconverter-common needed)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(dst))
    return dst


def int8_onnx(src: Path, dst: Path, size: int, calibration_images: int = 8) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations) by onnxruntime's own
    quantiser, calibrated on ``calibration_images`` seeded random RGB frames: the benchmark's models are
    untrained, so the calibration sets only the scales that the latency depends on, not an accuracy."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.random((1, 3, size, size), dtype=np.float32)}
                                 for _ in range(calibration_images)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = dst.with_name(f"{dst.stem}-prepared.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(dst), Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def ort_session(path: Path, provider: str | tuple[str, dict], threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    wanted = provider if isinstance(provider, str) else provider[0]
    fallback = [] if wanted == "CPUExecutionProvider" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=[provider, *fallback])
    if session.get_providers()[0] != wanted:
        raise RuntimeError(f"{wanted} was not used (session providers: {session.get_providers()})")
    return session


def ort_call(session, x: np.ndarray, on_gpu: bool) -> Callable[[], object]:
    """One inference; on a GPU provider input and output stay on the device (IO binding)."""
    import onnxruntime as ort

    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    if not on_gpu:
        return lambda: session.run(None, {name: x})
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(out, "cuda", 0)
    return lambda: session.run_with_iobinding(binding)


def ort_variants(available: Sequence[str], cuda: bool, trt_cache: Path) -> dict[str, tuple[Any, str, bool]]:
    """Back-end name -> (provider spec, model precision "fp32" | "fp16" | "int8", on GPU?) for the providers
    present."""
    variants: dict[str, tuple[Any, str, bool]] = {"ort_cpu": ("CPUExecutionProvider", "fp32", False),
                                                  "ort_cpu_fp16": ("CPUExecutionProvider", "fp16", False),
                                                  "ort_cpu_int8": ("CPUExecutionProvider", "int8", False)}
    if cuda and "CUDAExecutionProvider" in available:
        variants["ort_cuda"] = ("CUDAExecutionProvider", "fp32", True)
        variants["ort_cuda_fp16"] = ("CUDAExecutionProvider", "fp16", True)
    if cuda and "TensorrtExecutionProvider" in available:
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
        variants["ort_tensorrt_fp16"] = (("TensorrtExecutionProvider", trt), "fp32", True)
    return variants


def ort_backends(head: ProbabilityHead, method: str, size: int, setup: Setup,
                 threads: int | None) -> dict[str, Callable[[int, int], dict]]:
    """Back-end name -> measure(batch, size) for ONNX Runtime; export/convert lazily, once per method."""
    import onnxruntime as ort

    files: dict[str, Path | BaseException] = {}
    convert = {"fp16": fp16_onnx, "int8": functools.partial(int8_onnx, size=size)}

    def model_file(precision: str) -> Path:
        if precision not in files:
            try:
                if precision == "fp32":
                    files[precision] = export_onnx(copy.deepcopy(head.model).cpu().float(),
                                                   setup.workdir / f"{method}-{size}.onnx", size, mean=MEAN, std=STD)
                else:
                    files[precision] = convert[precision](model_file("fp32"),
                                                          setup.workdir / f"{method}-{size}-{precision}.onnx")
            except Exception as exc:
                files[precision] = exc
        if isinstance(files[precision], BaseException):
            step = "export" if precision == "fp32" else f"{precision} conversion"
            raise RuntimeError(f"{step} failed: {failure(files[precision])}")
        return files[precision]

    def measure(provider: Any, precision: str, on_gpu: bool) -> Callable[[int, int], dict]:
        def run(batch: int, size_: int) -> dict:
            spec = provider
            if not isinstance(provider, str):  # TensorRT: one static profile per batch size
                shape = f"image:{batch}x3x{size_}x{size_}"
                spec = (provider[0], {**provider[1], "trt_profile_min_shapes": shape,
                                      "trt_profile_opt_shapes": shape, "trt_profile_max_shapes": shape})
            start = time.perf_counter()
            session = ort_session(model_file(precision), spec, threads)
            x = np.random.default_rng(0).random((batch, 3, size_, size_), dtype=np.float32)
            call = ort_call(session, x, on_gpu)
            call()
            return {**setup.timed(call, batch), "setup_s": time.perf_counter() - start,
                    "providers": session.get_providers()[:1]}

        return run

    variants = ort_variants(ort.get_available_providers(), setup.device.type == "cuda", setup.workdir / "trt")
    return {name: measure(*v) for name, v in variants.items()}


def bench_method(method: str, kwargs: dict, size: int, batches: Sequence[int], setup: Setup,
                 ceiling_tflops: float | None, threads: int | None) -> tuple[dict, list[dict]]:
    """Model facts (params, MACs, ceiling) and one row per (back-end, batch)."""
    head = deployable(method, kwargs)
    macs = count_macs(head.model, size)
    info = {"method": method, "kwargs": kwargs, "params": count_params(head.model), "macs": macs,
            "image_size": size, "ceiling_fps": ceiling_tflops * 1e12 / (2 * macs) if ceiling_tflops and macs else None}
    measures = {**torch_backends(head, setup), **ort_backends(head, method, size, setup, threads)}
    rows = []
    for name, measure in measures.items():
        if not any(name == b or (b == "ort" and name.startswith("ort_")) for b in setup.backends):
            continue
        for batch in batches:
            row = {"method": method, "backend": name, "batch": batch, "status": "ok"}
            try:
                row.update(measure(batch, size))
            except Exception as exc:
                row["status"] = failure(exc)
            rows.append(row)
            print(f"  {method:>14} {name:>18} b{batch:<3} {row.get('p50_ms', float('nan')):9.2f} ms  {row['status'][:80]}",
                  flush=True)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    add_ratios(rows, info["ceiling_fps"])
    return info, rows


def add_ratios(rows: list[dict], ceiling_fps: float | None) -> None:
    """speedup_vs_eager = eager p50 / p50 at the same batch; fraction_of_ceiling = FPS / ceiling FPS."""
    eager = {r["batch"]: r["p50_ms"] for r in rows if r["backend"] == "eager_fp32" and r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        if row["batch"] in eager:
            row["speedup_vs_eager"] = eager[row["batch"]] / row["p50_ms"]
            row["latency_vs_eager"] = row["p50_ms"] / eager[row["batch"]]
        if ceiling_fps:
            row["fraction_of_ceiling"] = row["fps"] / ceiling_fps


# ---------------------------------------------------------------- training throughput


def train_throughput(method: str, kwargs: dict, size: int, batch: int, loss: str, setup: Setup) -> dict:
    """images/s of forward + loss + backward + AdamW step, as ``polypflow.training`` trains with the default
    recipe (channels-last, bf16 autocast where it pays on the device)."""
    device, amp = setup.device, bf16_pays(setup.device)
    torch.manual_seed(0)
    model = build_model(method, **kwargs).to(device).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss(loss)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.7).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        loss_fn(tuple(o.float() for o in outputs), y, 0).backward()
        optimizer.step()

    stats = latency(step, setup.warmup, setup.iterations, setup.sync)
    return {**stats, "images_per_s": 1e3 * batch / stats["mean_ms"], "amp": "bf16" if amp else "off"}


def bench_training(methods: Sequence[str], kwargs_of: Callable[[str], dict], loss_of: Callable[[str], str],
                   size: int, batches: Sequence[int], setup: Setup) -> list[dict]:
    rows = []
    for method in methods:
        for batch in batches:
            row = {"method": method, "batch": batch, "image_size": size, "status": "ok"}
            try:
                row.update(train_throughput(method, kwargs_of(method), size, batch, loss_of(method), setup))
            except Exception as exc:  # out of memory included
                row["status"] = failure(exc)
            rows.append(row)
            print(f"  train {method:>14} b{batch:<3} {row.get('images_per_s', float('nan')):8.2f} img/s  {row['status'][:80]}",
                  flush=True)
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- data loading


def synthetic_files(root: Path, n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """Kvasir-like JPEG frames (~620×530) with JPEG masks, when the real data is absent."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng, pairs = np.random.default_rng(seed), []
    yy, xx = np.mgrid[:530, :620]
    for i in range(n):
        cx, cy, r = rng.integers(150, 450), rng.integers(150, 380), rng.integers(40, 140)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        image = np.clip(np.array([180, 110, 100]) + rng.normal(0, 12, (530, 620, 3)), 0, 255)
        image[inside] *= [1.1, 0.7, 0.6]
        pair = (root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg")
        Image.fromarray(image.astype(np.uint8)).save(pair[0], quality=90)
        Image.fromarray((inside * 255).astype(np.uint8)).save(pair[1], quality=90)
        pairs.append(pair)
    return pairs


def data_pairs(root: Path | None, n: int, workdir: Path) -> tuple[list[tuple[Path, Path]], str]:
    """The first ``n`` image/mask pairs (sorted by name) of ``root``, else synthetic ones."""
    if root is not None and (root / "images").is_dir() and (root / "masks").is_dir():
        masks = {p.stem: p for p in (root / "masks").iterdir()}
        pairs = [(p, masks[p.stem]) for p in sorted((root / "images").iterdir()) if p.stem in masks][:n]
        if pairs:
            return pairs, f"real: {root} ({len(pairs)} pairs)"
    return synthetic_files(workdir / "synthetic", n), f"synthetic: {n} Kvasir-like 620x530 JPEG pairs"


def image_set(pairs: list[tuple[Path, Path]], size: int, cache: Path) -> ImageSet:
    """The project's uint8 cache (``load_image_set``) for ``pairs``."""
    import pandas as pd

    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    facts = pd.DataFrame({"dataset": "bench", "id": [str(i) for i in range(len(pairs))],
                          "image_path": [str(a) for a, _ in pairs], "mask_path": [str(b) for _, b in pairs],
                          "image_sha256": [sha(a) for a, _ in pairs], "mask_sha256": [sha(b) for _, b in pairs]})
    return load_image_set(facts, [f"bench/{i}" for i in range(len(pairs))], size, 127, cache)


def decode_each_time(pairs: list[tuple[Path, Path]], size: int, augment: str, passes: int) -> float:
    """images/s of decode (PIL) + resize (cv2) + augment + normalise, from the files every time."""
    import cv2

    transform = augmentation(augment)
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for image_path, mask_path in pairs:
            image = cv2.resize(read_image(image_path), (size, size), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(read_mask(mask_path, 127), (size, size), interpolation=cv2.INTER_NEAREST)
            if transform is not None:
                out = transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            to_tensor(image, "imagenet")
            count += 1
    return count / (time.perf_counter() - start)


def loader_throughput(data: ImageSet, augment: str, workers: int, batch: int, passes: int) -> float:
    """images/s of the trainer's DataLoader over the uint8 cache (one warm pass not counted)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(SegDataset(data, "imagenet", augment), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:
        pass
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for x, _y in loader:
            count += len(x)
    return count / (time.perf_counter() - start)


def gpu_augment(data: ImageSet, device: torch.device, batch: int, passes: int) -> float:
    """images/s of uint8 upload + random flips/rot90 + normalisation on the GPU, per batch."""
    images = torch.from_numpy(data.images)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    count, start = 0, None
    for p in range(passes + 1):
        if p == 1:
            torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            flip = torch.rand(len(x), device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
            ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            count += len(x)
    torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def bench_data(root: Path | None, n: int, size: int, batch: int, workers: Sequence[int], setup: Setup) -> dict:
    """Decode-every-time vs uint8 cache + augment (per worker count) vs GPU-side augmentation."""
    pairs, source = data_pairs(root, n, setup.workdir)
    passes = 1 if setup.quick else 2
    report: dict[str, Any] = {"source": source, "items": len(pairs), "image_size": size, "batch": batch, "rows": []}
    start = time.perf_counter()
    data = image_set(pairs, size, setup.workdir / "cache")
    report["cache_build_images_per_s"] = len(pairs) / (time.perf_counter() - start)
    start = time.perf_counter()
    image_set(pairs, size, setup.workdir / "cache")
    report["cache_load_images_per_s"] = len(pairs) / (time.perf_counter() - start)
    cases: list[tuple[str, Callable[[], float]]] = []
    for augment in ("basic", "strong"):
        cases.append((f"decode_jpeg_each_time+{augment}", lambda a=augment: decode_each_time(pairs, size, a, passes)))
        for w in workers:
            cases.append((f"uint8_cache+{augment} workers={w}",
                          lambda a=augment, w=w: loader_throughput(data, a, w, batch, passes)))
    if setup.device.type == "cuda":
        cases.append(("gpu_flip_rot90 (uint8 cache)", lambda: gpu_augment(data, setup.device, batch, passes * 4)))
    for name, fn in cases:
        row = {"pipeline": name, "status": "ok"}
        try:
            row["images_per_s"] = fn()
        except Exception as exc:
            row["status"] = failure(exc)
        report["rows"].append(row)
        print(f"  data {name:>36} {row.get('images_per_s', float('nan')):9.1f} img/s  {row['status'][:60]}", flush=True)
    return report


# ---------------------------------------------------------------- paper-profile timing


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


# ---------------------------------------------------------------- report


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Benchmark — {m['device_name']} ({m['device']}), {m['date']}", "",
             f"`{m['command']}`", "",
             f"torch {m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']} "
             f"(providers: {', '.join(m['ort_providers'])}), AMP dtype {m['amp_dtype']}, "
             f"{m['warmup']} warm-up + {m['iterations']} timed iterations.", ""]
    if "probe" in result:
        p = result["probe"]
        lines += ["## GEMM probe (achievable matmul FLOP/s: best / median window)", "",
                  "| dtype | n | TFLOP/s best | TFLOP/s median |", "|---|---:|---:|---:|"]
        lines += [f"| {v['dtype']} | {v.get('n', '–')} | {fmt(v.get('tflops'), 3)} {v.get('status', '')}"
                  f"| {fmt(v.get('tflops_median'), 3)} |" for v in p.values() if isinstance(v, dict)]
        lines.append("")
    if "models" in result:
        lines += ["## Models at the benchmark size", "", "| method | params (M) | GMACs/image | ceiling FPS |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {i['method']} | {i['params'] / 1e6:.2f} | {i['macs'] / 1e9:.2f} | {fmt(i['ceiling_fps'], 0)} |"
                  for i in result["models"]]
        lines += ["", "## Inference (per batch; FPS = batch / p50)", "",
                  "| method | backend | batch | p50 ms | p95 ms | FPS | × eager | % of ceiling | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["inference"]:
            ceiling = r.get("fraction_of_ceiling")
            lines.append(f"| {r['method']} | {r['backend']} | {r['batch']} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p95_ms'))} "
                         f"| {fmt(r.get('fps'), 1)} | {fmt(r.get('speedup_vs_eager'))} "
                         f"| {fmt(ceiling * 100 if ceiling is not None else None, 1)} | {r['status']} |")
        lines.append("")
    lines += training_md(result) + data_md(result) + paper_md(result) + targets_md(result)
    return "\n".join(lines) + "\n"


def training_md(result: dict) -> list[str]:
    if "training" not in result:
        return []
    lines = ["## Training throughput (forward + loss + backward + AdamW step)", "",
             "| method | size | batch | images/s | step p50 ms | AMP | status |", "|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['method']} | {r['image_size']} | {r['batch']} | {fmt(r.get('images_per_s'))} | {fmt(r.get('p50_ms'))} "
              f"| {r.get('amp', '–')} | {r['status']} |" for r in result["training"]]
    return [*lines, ""]


def data_md(result: dict) -> list[str]:
    if "data" not in result:
        return []
    d = result["data"]
    lines = [f"## Data loading ({d['source']}; {d['image_size']} px, batch {d['batch']})", "",
             f"Building the uint8 cache (decode + resize + write): {d['cache_build_images_per_s']:.1f} images/s; "
             f"reading it back: {d['cache_load_images_per_s']:.0f} images/s.", "",
             "| pipeline | images/s | status |", "|---|---:|---|"]
    lines += [f"| {r['pipeline']} | {fmt(r.get('images_per_s'), 1)} | {r['status']} |" for r in d["rows"]]
    if d.get("keeps_up"):
        lines += ["", "Loader vs training (best CPU loader with `basic` augmentation / training images/s):", "",
                  "| method | batch | training images/s | loader images/s | loader / training |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k['method']} | {k['batch']} | {fmt(k['train_images_per_s'])} | {fmt(k['loader_images_per_s'], 1)} "
                  f"| {fmt(k['ratio'])} |" for k in d["keeps_up"]]
    return [*lines, ""]


def paper_md(result: dict) -> list[str]:
    if "paper_ic_polypseg" not in result:
        return []
    p = result["paper_ic_polypseg"]
    if "status" in p:
        return ["## Paper profile: IC-PolypSeg-EF0, PraNet protocol", "", p["status"], ""]
    return ["## Paper profile: IC-PolypSeg-EF0, PraNet protocol (352 px, batch 16, multiscale, 100 epochs)", "",
            f"Data: {p['data']}; full train set {p['train']} images, val {p['val']}.",
            f"Timed {p['epochs_timed']} epoch(s) on {p['train_items_timed']} train + {p['val_items_timed']} val images "
            f"through `polypflow.training.fit`: epoch times {', '.join(f'{s:.1f}' for s in p['epoch_s'])} s.",
            f"Estimated full epoch: {p['full_epoch_s_estimate']:.1f} s; **100 epochs ≈ {p['extrapolated_100_epochs_min']:.1f} min** "
            f"({p['method_of_extrapolation']}).", ""]


def targets_md(result: dict) -> list[str]:
    if not result.get("targets"):
        return []
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in result["targets"]]
    return [*lines, ""]


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets, judged only where this device can judge them."""
    cuda, rows, out = result["meta"]["device"].startswith("cuda"), result.get("inference", []), []
    ok = [r for r in rows if r["status"] == "ok"]
    ic = [r for r in ok if r["method"] == "ic_polypseg" and r["batch"] == 1]
    if ic:
        best = max(ic, key=lambda r: r["fps"])
        where = "" if cuda else " (CPU run: the target is for H100)"
        out.append({"target": "EF0-class >= 1000 FPS at batch 1 on H100", "measured":
                    f"{best['fps']:.1f} FPS ({best['backend']}){where}", "met": best["fps"] >= 1000 if cuda else "n/a"})
        out.append({"target": "EF0-class >= 3x PyTorch eager on H100", "measured":
                    f"{best.get('speedup_vs_eager', 0):.2f}x ({best['backend']}){where}",
                    "met": best.get("speedup_vs_eager", 0) >= 3 if cuda else "n/a"})
    if not cuda:
        for r in (r for r in ok if r["backend"] in ("ort_cpu", "ort_cpu_int8") and "latency_vs_eager" in r):
            precision = " int8" if r["backend"] == "ort_cpu_int8" else ""
            out.append({"target": f"ORT CPU{precision} latency <= 0.5x eager ({r['method']}, batch {r['batch']})",
                        "measured": f"{r['latency_vs_eager']:.2f}x", "met": r["latency_vs_eager"] <= 0.5})
    paper = result.get("paper_ic_polypseg", {})
    if "extrapolated_100_epochs_min" in paper:
        out.append({"target": "paper training of EF0 <= 10 min on H100", "measured":
                    f"{paper['extrapolated_100_epochs_min']:.1f} min (extrapolated)", "met":
                    paper["extrapolated_100_epochs_min"] <= 10 if cuda else "n/a"})
    return out


def keeps_up(data: dict, training: list[dict]) -> list[dict]:
    """Best CPU loader (basic augmentation, uint8 cache) against each training throughput."""
    loaders = [r["images_per_s"] for r in data["rows"] if r["status"] == "ok" and r["pipeline"].startswith("uint8_cache+basic")]
    if not loaders:
        return []
    return [{"method": t["method"], "batch": t["batch"], "train_images_per_s": t["images_per_s"],
             "loader_images_per_s": max(loaders), "ratio": max(loaders) / t["images_per_s"]}
            for t in training if t["status"] == "ok" and t["image_size"] == data["image_size"]]


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = evaluate_targets(result)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench.md").write_text(markdown(result))


# ---------------------------------------------------------------- command line


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
    p.add_argument("--paper-epochs", type=int, default=1)
    p.add_argument("--paper-items", type=int, help="train images timed per epoch (default: all on CUDA, 32 on CPU)")
    p.add_argument("--with-sections", action="store_true", help="with --paper-ic-polypseg, also run the other sections")
    return p.parse_args(argv)


def make_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
    backends = [b for b in args.backends if not (args.skip_compile and b == "compile")]
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    warmup, iterations = (1, min(args.iterations, 2)) if args.quick else (args.warmup, args.iterations)
    return Setup(device, amp, warmup, iterations, mode, workdir, args.quick, backends)


def load_project_params(path: Path) -> Any | None:
    from polypflow.config import load_params

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
            print("paper profile: IC-PolypSeg-EF0 ...", flush=True)
            try:
                result["paper_ic_polypseg"] = bench_paper(params, args.paper_epochs, items, setup)
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
        loss_of = lambda m: params.recipe(m).loss if params is not None and m in params.methods else "bce_dice"  # noqa: E731
        batches = [2] if args.quick else args.train_batches
        result["training"] = bench_training(args.train_methods or methods, kwargs_of, loss_of, args.image_size,
                                            batches, setup)
        write(result, args.out)
    if not args.skip_data:
        n = min(args.data_items, 8) if args.quick else args.data_items
        workers = [0] if args.quick else args.loader_workers
        result["data"] = bench_data(args.data_root, n, args.image_size, 16, workers, setup)
        result["data"]["keeps_up"] = keeps_up(result["data"], result.get("training", []))
        write(result, args.out)


if __name__ == "__main__":
    run()
