"""Stage 7, profile@<method>: parameters, MACs, latency p50/p95 and FPS for PyTorch and ONNX Runtime.

MACs are counted at ``profile.macs_image_size`` (352 px, the papers' reference) and at the method's own
size; latency is measured at the method's size, on the device present (CUDA when available), with the
batch size of ``profile.batch_size``.
"""

from __future__ import annotations

import logging
import platform

import torch

from polypflow import tracking
from polypflow.config import Params
from polypflow.io import write_json
from polypflow.onnx_export import onnx_session
from polypflow.layout import method_layout, read_json
from polypflow.profiling import count_macs, count_params, ort_latency, torch_latency
from polypflow.training import load_trained, resolve_device
from stages._cli import method_main

log = logging.getLogger(__name__)


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


def run(params: Params, method: str) -> dict:
    """Profile ``method``'s trained model and its ONNX export; write ``profile.json``."""
    import mlflow

    cfg = params.profile
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    files = method_layout(params, method)
    train_run = read_json(files.run_record("train"))["run_id"]
    tracking.require_run(params, train_run, files.run_record("train"))
    model, meta = load_trained(files.model)
    size, device = meta["image_size"], resolve_device(params.device)
    session = onnx_session(files.onnx, cfg.threads)
    report = {
        "params": count_params(model),
        "macs_at_macs_image_size": count_macs(model, cfg.macs_image_size),
        "macs_image_size": cfg.macs_image_size,
        "macs_at_image_size": count_macs(model, size),
        "image_size": size, "batch_size": cfg.batch_size, "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch_latency(model, size, cfg.batch_size, cfg.warmup, cfg.iterations, device),
        "onnxruntime": ort_latency(session, size, cfg.batch_size, cfg.warmup, cfg.iterations),
    }
    write_json(files.profile, report)
    flat = {"params": report["params"], "gmacs_352": report["macs_at_macs_image_size"] / 1e9,
            "torch_p50_ms": report["torch"]["p50_ms"], "torch_p95_ms": report["torch"]["p95_ms"],
            "torch_fps": report["torch"]["fps"], "ort_p50_ms": report["onnxruntime"]["p50_ms"],
            "ort_p95_ms": report["onnxruntime"]["p95_ms"], "ort_fps": report["onnxruntime"]["fps"]}
    with tracking.stage_run(params, "profile", method, parent_run_id=train_run) as run:
        mlflow.log_metrics(flat)
        mlflow.log_dict(report, "profile.json")
    write_json(files.run_record("profile"), {"run_id": run.info.run_id})
    log.info("%s: %.2f M params, %.2f GMACs@%d, torch p50 %.1f ms, ORT p50 %.1f ms", method, report["params"] / 1e6,
             flat["gmacs_352"], cfg.macs_image_size, flat["torch_p50_ms"], flat["ort_p50_ms"])
    return report


if __name__ == "__main__":
    method_main(__doc__, run)
