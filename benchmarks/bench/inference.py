"""Inference back-ends: the deployable graph timed in PyTorch (eager, channels-last, AMP, torch.compile) and in
ONNX Runtime (fp32, fp16, int8 on the CPU; CUDA and TensorRT where the providers exist).

Every back-end times :class:`~polypflow.infer.onnx.DeployGraph` with the segmenter's head (normalisation + model + sigmoid of the main map), so PyTorch and
ONNX Runtime do the same work. Latency is per batch; FPS = batch / p50.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.bench.common import MEAN, STD, Setup, failure
from models import build_model
from polypflow.infer.onnx import DeployGraph, export_onnx, probability, quantize_int8
from polypflow.evaluate.profiling import count_macs, count_params

OPSET = 18  # the lowest opset the dynamo exporter writes; the pipeline's own is export.opset


def deployable(method: str, kwargs: dict) -> DeployGraph:
    torch.manual_seed(0)
    return DeployGraph(build_model(method, **kwargs), probability, MEAN, STD).eval()


def no_grad_call(head: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return head(x)

    return call


def torch_backends(head: DeployGraph, setup: Setup) -> dict[str, Callable[[int, int], dict]]:
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
    """The pipeline's static int8 quantisation (:func:`~polypflow.infer.onnx.quantize_int8`: QDQ, per-channel int8
    weights, uint8 activations), calibrated on ``calibration_images`` seeded random RGB frames: the benchmark's
    models are untrained, so the calibration sets only the scales that the latency depends on, not an accuracy
    (export@ calibrates on the method's training images and checks its Dice)."""
    rng = np.random.default_rng(0)
    return quantize_int8(src, dst, (rng.random((1, 3, size, size), dtype=np.float32) for _ in range(calibration_images)))


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


def ort_backends(head: DeployGraph, method: str, size: int, setup: Setup,
                 threads: int | None) -> dict[str, Callable[[int, int], dict]]:
    """Back-end name -> measure(batch, size) for ONNX Runtime; export/convert lazily, once per method."""
    import onnxruntime as ort

    files: dict[str, Path | BaseException] = {}
    convert = {"fp16": fp16_onnx, "int8": functools.partial(int8_onnx, size=size)}

    def model_file(precision: str) -> Path:
        if precision not in files:
            try:
                if precision == "fp32":
                    graph = DeployGraph(copy.deepcopy(head.model).cpu().float(), probability, MEAN, STD)
                    files[precision] = export_onnx(graph, setup.workdir / f"{method}-{size}.onnx", size, OPSET,
                                                   ("probability",))
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
