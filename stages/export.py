"""Stage 8, export@<method>: ONNX (dynamo exporter, dynamic batch), checked against PyTorch.

The graph takes RGB images in [0, 1] (normalisation is inside it) at the method's training size and
returns the main map's probability; a detector's returns every anchor's decoded box and score, NMS after it
(:mod:`polypflow.detection.export`), and its parity is compared after the same NMS. The max absolute difference to PyTorch on random input is reported
and must stay under ``export.atol``; the file is logged to the method's MLflow training run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from polypflow import tracking
from polypflow.config import Params
from polypflow.io import write_json
from polypflow.onnx_export import export_onnx, parity
from polypflow.layout import method_layout, read_json
from polypflow.training import load_trained
from stages._cli import method_main

log = logging.getLogger(__name__)


def export_detector(model, meta: dict, path: Path, params: Params) -> tuple[Path, float, dict]:
    """A detector's graph (decoding inside, NMS outside: :mod:`polypflow.detection.export`) and its parity with
    PyTorch after the same NMS: the largest difference of any detection's box (pixels) or score."""
    from polypflow.detection.export import detector_parity, export_detector_onnx

    size, norm = meta["image_size"], {"mean": meta["mean"], "std": meta["std"]}
    path = export_detector_onnx(model, path, size, params.export.opset, **norm)
    decode = meta.get("decode", {})
    check = detector_parity(model, path, size, **norm, **decode)
    diff = max(check["boxes_max_abs"], check["scores_max_abs"])
    extra = {"output": "boxes N x A x 4 (x1 y1 x2 y2, pixels) and scores N x A before NMS; NMS after the graph "
                       "(models.gfl_atss.postprocess)", "decode": decode, "detections": check}
    return path, diff, extra


def run(params: Params, method: str) -> dict:
    """Export ``method``'s trained model to ``artifacts/export/<method>/model.onnx`` and check it."""
    import mlflow

    files = method_layout(params, method)
    train_run = read_json(files.run_record("train"))["run_id"]
    tracking.require_run(params, train_run, files.run_record("train"))
    model, meta = load_trained(files.model)
    size, norm = meta["image_size"], {"mean": meta["mean"], "std": meta["std"]}
    if meta.get("task") == "detection":
        path, diff, extra = export_detector(model, meta, files.onnx, params)
    else:
        path = export_onnx(model, files.onnx, size, params.export.opset, **norm)
        diff, extra = parity(model, path, size, **norm), {"output": "N x 1 x S x S polyp probability"}
    report = {"max_abs_diff": diff, "atol": params.export.atol, "opset": params.export.opset,
              "input": f"N x 3 x {size} x {size}, RGB in [0, 1]", "bytes": path.stat().st_size, **extra}
    write_json(files.parity, report)
    if diff > params.export.atol:
        raise RuntimeError(f"{path}: ONNX differs from PyTorch by {diff:.2e} > export.atol {params.export.atol}")
    with tracking.stage_run(params, "export", method, parent_run_id=train_run) as run:
        mlflow.log_metrics({"onnx_max_abs_diff": diff, "onnx_bytes": report["bytes"]})
        mlflow.log_artifact(str(path), artifact_path="onnx")
    write_json(files.run_record("export"), {"run_id": run.info.run_id})
    log.info("%s: exported %s (%d bytes), max |onnx - torch| = %.2e", method, path, report["bytes"], diff)
    return report


if __name__ == "__main__":
    method_main(__doc__, run)
