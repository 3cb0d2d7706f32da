"""Stage 8, export@<method>: ONNX (dynamo exporter, ``export.opset``, dynamic batch), checked against PyTorch.

The graph takes RGB images in [0, 1] (normalisation is inside it) at the method's training size and returns what
the task's head makes of the model's outputs (:mod:`polypflow.infer.onnx`): a segmenter's main-map probability, or
a detector's decoded box and score for every anchor (NMS after it; parity compared after the same NMS). The
largest difference to PyTorch on random input is reported in ``parity.json`` and must stay under
``export.atol``; the file is logged to the method's MLflow training run.
"""

from __future__ import annotations

import logging

import mlflow

from polypflow.io import read_json, write_json
from polypflow.settings.config import Params
from polypflow.settings.layout import method_layout
from polypflow.tasks import task_of
from polypflow.track import runs as tracking
from polypflow.train.checkpoint import load_trained
from stages._cli import method_main

log = logging.getLogger(__name__)


def run(params: Params, method: str) -> dict:
    """Export ``method``'s trained model to ``artifacts/export/<method>/model.onnx`` and check it."""
    files = method_layout(params, method)
    train_run = read_json(files.run_record("train"))["run_id"]
    tracking.require_run(params, train_run, files.run_record("train"))
    model, meta = load_trained(files.model)
    diff, extra = task_of(meta["arch"]).export(model, meta, files.onnx, params.export.opset)
    size = meta["image_size"]
    report = {"max_abs_diff": diff, "atol": params.export.atol, "opset": params.export.opset,
              "input": f"N x 3 x {size} x {size}, RGB in [0, 1]", "bytes": files.onnx.stat().st_size, **extra}
    write_json(files.parity, report)
    if diff > params.export.atol:
        raise RuntimeError(f"{files.onnx}: ONNX differs from PyTorch by {diff:.2e} > export.atol {params.export.atol}")
    with tracking.stage_run(params, "export", method, parent_run_id=train_run) as run:
        mlflow.log_metrics({"onnx_max_abs_diff": diff, "onnx_bytes": report["bytes"]})
        mlflow.log_artifact(str(files.onnx), artifact_path="onnx")
    write_json(files.run_record("export"), {"run_id": run.info.run_id})
    log.info("%s: exported %s (%d bytes), max |onnx - torch| = %.2e", method, files.onnx, report["bytes"], diff)
    return report


if __name__ == "__main__":
    method_main(__doc__, run)
