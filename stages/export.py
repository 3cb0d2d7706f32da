"""Stage 8, export@<method>: ONNX (dynamo exporter, ``export.opset``, dynamic batch), checked against PyTorch.

The graph takes RGB images in [0, 1] (normalisation is inside it) at the method's training size and returns what
the task's head makes of the model's outputs (:mod:`polypflow.infer.onnx`): a segmenter's main-map probability, or
a detector's decoded box and score for every anchor (NMS after it; parity compared after the same NMS). The
largest difference to PyTorch on random input is reported in ``parity.json`` and must stay under
``export.atol``; the file is logged to the method's MLflow training run.

Then the int8 graph (``int8/model.onnx``): the task quantises the fp32 graph statically (QDQ), calibrated on
``export.int8_calibration_images`` of the images the method trained on (with more than one weight range in
``export.int8_weight_bits``, the one dropping least on the validation images ships, each candidate's drop recorded
under ``selection``; the method's ``int8_float_modules`` stay in float32), and scores both graphs on every test set
(``int8/check.json``, and under ``int8`` in ``parity.json``; each image's score by each graph in
``int8/per_image.csv``, which the report pairs with published maps): a segmenter's Dice, a detector's box F1 after
the same NMS. A drop beyond the task's budget (``export.int8_max_dice_drop``, ``export.int8_max_f1_drop``) does not
fail the stage: it is recorded (``within_budget: false``) and logged as a warning.

A model shipped with test-time augmentation is also exported as its plain network (``plain/``: the same weights in
one pass, its fp32 and int8 graphs scored on every test set in ``plain/check.json`` and ``plain/per_image.csv``), so
profile@ and the report can set what the augmentation buys against what it costs; the shipped graph stays the
augmented one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from polypflow.io import read_json, write_json
from polypflow.settings.config import Params
from polypflow.settings.layout import method_layout
from polypflow.tasks import task_of
from polypflow.tasks.graphs import int8_check, plain_graphs, require_parity
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
    write_json(files.parity, report)  # what was measured stays, even when the graph is refused
    require_parity(files.onnx, diff, params.export.atol)
    report["int8"] = check = int8_check(params, method, meta, files.onnx, files.int8_onnx, files.int8_scores)
    write_json(files.int8_check, check)
    report["plain"] = bare = plain_graphs(params, method, model, meta, files.plain_onnx, files.plain_int8_onnx,
                                          files.plain_scores)
    write_json(files.plain_check, bare)
    write_json(files.parity, report)
    with tracking.stage_run(params, "export", method, parent_run_id=train_run) as run:
        mlflow.log_metrics({"onnx_max_abs_diff": diff, "onnx_bytes": report["bytes"], **int8_metrics(check),
                            **{f"plain_{k}": v for k, v in int8_metrics(bare).items()}})
        mlflow.log_artifact(str(files.onnx), artifact_path="onnx")
        mlflow.log_dict(check, "onnx_int8/check.json")
        mlflow.log_artifact(str(files.int8_onnx), artifact_path="onnx_int8")
        mlflow.log_artifact(str(files.int8_scores), artifact_path="onnx_int8")
        if bare["applies"]:
            mlflow.log_artifacts(str(files.plain_dir), artifact_path="onnx_plain")
    write_json(files.run_record("export"), {"run_id": run.info.run_id})
    log.info("%s: exported %s (%d bytes), max |onnx - torch| = %.2e", method, files.onnx, report["bytes"], diff)
    log_int8(method, check, files.int8_check)
    if bare["applies"]:
        log_int8(f"{method} without its {bare['shipped_tta']} TTA", bare, files.plain_check)
    return report


def int8_metrics(check: dict) -> dict[str, float]:
    """An int8 check's figures as MLflow metrics, named by its score (``int8_kvasir_dice``, ``int8_worst_f1_drop``);
    none for a plain-network check that does not apply."""
    if not check.get("quantised"):
        return {}
    score = check["score"]
    scores = {f"{graph}_{dataset}_{score}": s[graph] for dataset, s in check["test_sets"].items()
              for graph in ("fp32", "int8")}
    return {**scores, f"int8_worst_{score}_drop": check["worst_drop"],
            "int8_within_budget": float(check["within_budget"]), "int8_weight_bits": float(check["weight_bits"])}


def log_int8(method: str, check: dict, where: Path) -> None:
    if "selection" in check:
        chosen = check["selection"]
        drops = ", ".join(f"{bits}-bit {c['drop']:+.4f}" for bits, c in chosen["candidates"].items())
        log.info("%s: int8 weights in %d bits, chosen on %d validation images (drop from fp32 %.4f: %s)", method,
                 check["weight_bits"], chosen["n"], chosen["fp32"], drops)
    for dataset, s in check["test_sets"].items():
        log.info("%s: %s %s fp32 %.4f, int8 %.4f (drop %+.4f)", method, dataset, check["metric"], s["fp32"], s["int8"],
                 s["drop"])
    if not check["within_budget"]:
        log.warning("%s: int8 %s drops by %.4f on a test set, more than %s %.4f: int8 not within budget (recorded "
                    "in %s)", method, check["metric"], check["worst_drop"], check["budget"], check["max_drop"], where)


if __name__ == "__main__":
    method_main(__doc__, run)
