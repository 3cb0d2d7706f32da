"""Stage 8, export@<method>: ONNX (dynamo exporter, dynamic batch), checked against PyTorch.

The graph takes RGB images in [0, 1] (normalisation is inside it) at the method's training size and
returns the main map's probability. The max absolute difference to PyTorch on random input is reported
and must stay under ``export.atol``; the file is logged to the method's MLflow training run.
"""

from __future__ import annotations

import logging

from polypflow import tracking
from polypflow.config import Params
from polypflow.io import write_json
from polypflow.onnx_export import export_onnx, parity
from polypflow.layout import method_layout, read_json
from polypflow.training import load_trained
from stages._cli import method_main

log = logging.getLogger(__name__)


def run(params: Params, method: str) -> dict:
    """Export ``method``'s trained model to ``artifacts/export/<method>/model.onnx`` and check it."""
    import mlflow

    files = method_layout(params, method)
    train_run = read_json(files.run_record("train"))["run_id"]
    tracking.require_run(params, train_run, files.run_record("train"))
    model, meta = load_trained(files.model)
    size, norm = meta["image_size"], {"mean": meta["mean"], "std": meta["std"]}
    path = export_onnx(model, files.onnx, size, params.export.opset, **norm)
    diff = parity(model, path, size, **norm)
    report = {"max_abs_diff": diff, "atol": params.export.atol, "opset": params.export.opset,
              "input": f"N x 3 x {size} x {size}, RGB in [0, 1]", "bytes": path.stat().st_size}
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
