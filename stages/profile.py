"""Stage 7, profile@<method>: parameters, MACs, latency p50/p95 and FPS for PyTorch and ONNX Runtime.

MACs are counted at ``profile.macs_image_size`` (352 px, the papers' reference) and at the method's own
size; latency is measured at the method's size, on the device present (CUDA when available), with the
batch size of ``profile.batch_size``. ONNX Runtime on the CPU is also timed for the fp32 and int8 graphs at each
size of ``profile.ort_sizes`` with each thread count of ``profile.ort_threads`` (``ort_grid``): the exported graph's
size is fixed, so both are rebuilt from the checkpoint at each size in a temporary folder (the fp32 graph by the
task's export, the int8 one by its quantisation in the weight range export@ chose, read from its ``check.json``,
calibrated on the method's training images at that size). A model shipped with test-time augmentation has its
plain network timed the same way (rows ``graph: plain``; export@ scores its accuracy in ``plain/check.json``), so
what the augmentation costs is measured beside what it buys.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import torch

from polypflow.track import runs as tracking
from polypflow.settings.config import Params
from polypflow.infer.onnx import onnx_session
from polypflow.io import read_json, write_json
from polypflow.settings.layout import method_layout
from polypflow.evaluate.profiling import (count_macs, count_params, device_name, grid_metrics, ort_grid, ort_latency,
                                          torch_latency)
from polypflow.tasks.graphs import exported_weight_bits, graphs_by_size
from polypflow.infer.device import resolve_device
from polypflow.train.checkpoint import load_trained
from stages._cli import method_main

log = logging.getLogger(__name__)


def run(params: Params, method: str) -> dict:
    """Profile ``method``'s trained model and its ONNX export; write ``profile.json``."""
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
    with tempfile.TemporaryDirectory(prefix=f"profile-{method}-") as folder:
        bits = {graph: exported_weight_bits(read_json(check), check)
                for graph, check in (("shipped", files.int8_check), ("plain", files.plain_check))}
        graphs = graphs_by_size(params, method, model, meta, cfg.ort_sizes, Path(folder), bits)
        report["ort_grid"] = [row for graph, at in graphs.items() for row in
                              ort_grid(at, cfg.ort_threads, cfg.batch_size, cfg.warmup, cfg.iterations, graph)]
    write_json(files.profile, report)
    gmacs = f"gmacs_{cfg.macs_image_size}"  # GMACs at the papers' reference size
    flat = {"params": report["params"], gmacs: report["macs_at_macs_image_size"] / 1e9,
            "torch_p50_ms": report["torch"]["p50_ms"], "torch_p95_ms": report["torch"]["p95_ms"],
            "torch_fps": report["torch"]["fps"], "ort_p50_ms": report["onnxruntime"]["p50_ms"],
            "ort_p95_ms": report["onnxruntime"]["p95_ms"], "ort_fps": report["onnxruntime"]["fps"],
            **grid_metrics(report["ort_grid"])}
    with tracking.stage_run(params, "profile", method, parent_run_id=train_run) as run:
        mlflow.log_metrics(flat)
        mlflow.log_dict(report, "profile.json")
    write_json(files.run_record("profile"), {"run_id": run.info.run_id})
    log.info("%s: %.2f M params, %.2f GMACs@%d, torch p50 %.1f ms, ORT p50 %.1f ms", method, report["params"] / 1e6,
             flat[gmacs], cfg.macs_image_size, flat["torch_p50_ms"], flat["ort_p50_ms"])
    for row in report["ort_grid"]:
        log.info("%s: ORT %s %s %d px, %d thread(s): p50 %.1f ms, %.1f FPS", method, row["graph"], row["precision"],
                 row["size"], row["threads"], row["p50_ms"], row["fps"])
    return report


if __name__ == "__main__":
    method_main(__doc__, run)
