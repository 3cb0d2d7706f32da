"""Stage 9, register@<method>: the one place that registers a model and moves its ``champion`` alias.

Runs after the method was trained, evaluated, exported and profiled, and reads only their outputs. Its MLflow
run, named after the method, is the method's row in the runs table: validation and test Dice per set, the
toolbox's meanDic, box AP and AP50 (a detector's boxes, a segmenter's mask components), latency, size and ONNX
parity as metrics, the datasets the model was trained, validated and tested on as dataset inputs, and the ids of
the stage runs behind them as tags. The model the training run logged is registered under the method's name and
as a version of its task's cross-method model (``tracking.global_models``), tagged with what a user
ships it by (input size, normalisation, threshold, test figures, latency, the ONNX file); ``champion`` moves to it
only on a significant paired-bootstrap gain in its per-image validation score (Dice; a detector's box F1) over the
champion's (``tracking.promotion``). Weights already registered are not registered again. Writes
``artifacts/registry/<method>/registered.json``.
"""

from __future__ import annotations

import json
import logging

import mlflow
import pandas as pd

from polypflow.data.images import read_splits
from polypflow.evaluate.seg_metrics import MODEL_DICE
from polypflow.io import read_json, write_json
from polypflow.settings.config import Params
from polypflow.settings.layout import MethodLayout, method_layout
from polypflow.tasks import Task, task_of
from polypflow.track import registry
from polypflow.track import runs as tracking
from polypflow.track import view as mlflow_view
from polypflow.train.checkpoint import load_checkpoint, weights_digest
from stages._cli import method_main

log = logging.getLogger(__name__)


def headline(files: MethodLayout, task: type[Task], gmacs: str) -> dict[str, float]:
    """The figures a user compares methods by: validation and test Dice (a detector's AP), the box AP of each
    test set (a segmenter's mask components, or the detector's boxes), latency, size, ONNX parity."""
    train, summary, profile = read_json(files.metrics), read_json(files.eval_summary), read_json(files.profile)
    out = {task.metric: train[task.metric], "val_score": train[task.metric], "threshold": train["threshold"],
           "params_m": profile["params"] / 1e6, gmacs: profile["macs_at_macs_image_size"] / 1e9,
           "torch_p50_ms": profile["torch"]["p50_ms"], "ort_p50_ms": profile["onnxruntime"]["p50_ms"],
           "onnx_max_abs_diff": read_json(files.parity)["max_abs_diff"]}
    for dataset, s in summary.items():
        if MODEL_DICE in s:
            out[f"test.{dataset}.dice"] = s[MODEL_DICE]
            out[f"test.{dataset}.meanDic"] = s["tb_dice"]
        for key in ("box_ap", "box_ap50"):
            if s.get(key) is not None:
                out[f"test.{dataset}.{key}"] = s[key]
    return out


def version_tags(files: MethodLayout, figures: dict[str, float], export_run: str, metric: str) -> dict[str, str]:
    """What a registered version carries: how to feed it, its threshold, its figures, its ONNX file, its weights."""
    state = load_checkpoint(files.model)
    tags = {k: state[k] for k in ("method", "arch", "task", "image_size", "normalize", "mean", "std", "threshold",
                                  metric, "best_epoch") if k in state}
    tags["model_kwargs"] = json.dumps(state["model_kwargs"])
    tags.update({f"test_dice.{k.split('.')[1]}": f"{v:.4f}" for k, v in figures.items() if k.endswith(".dice")})
    tags.update({f"test_meandic.{k.split('.')[1]}": f"{v:.4f}" for k, v in figures.items() if k.endswith(".meanDic")})
    tags.update({f"test_box_ap50.{k.split('.')[1]}": f"{v:.4f}" for k, v in figures.items() if k.endswith(".box_ap50")})
    tags.update({"ort_p50_ms": f"{figures['ort_p50_ms']:.2f}", "onnx": f"runs:/{export_run}/onnx/model.onnx",
                 registry.WEIGHTS_TAG: weights_digest(state["state_dict"])})
    return {k: str(v) for k, v in tags.items()}


def run(params: Params, method: str) -> dict:
    """Log ``method``'s summary run, register its model and decide its promotion; write ``registered.json``."""
    files = method_layout(params, method)
    runs = {stage: read_json(files.run_record(stage))["run_id"] for stage in ("train", "evaluate", "export", "profile")}
    model_uri = read_json(files.run_record("train"))["model_uri"]
    tracking.require_run(params, runs["train"], files.run_record("train"))
    task = task_of(params.method_arch(method)[0])
    figures = headline(files, task, f"gmacs_{params.profile.macs_image_size}")
    val_scores = pd.read_csv(files.val_scores, dtype={"key": str}).set_index("key").iloc[:, 0]  # Dice, or box F1
    splits = read_splits(params)
    with tracking.stage_run(params, "register", method, run_name=method,
                            tags={f"polypflow.run.{stage}": run_id for stage, run_id in runs.items()}) as run:
        mlflow.log_params({"method": method, "arch": params.method_arch(method)[0],
                           "image_size": read_json(files.metrics)["image_size"], "split.scheme": splits["scheme"]})
        mlflow.log_metrics(figures)
        tracking.log_image_sets(params, {"training": splits["train"], "validation": splits["val"],
                                         **{f"testing.{d}": keys for d, keys in splits["test"].items() if keys}})
        registered = {}
        if params.tracking.register_models:
            registered = registry.register(
                model_uri, method, version_tags(files, figures, runs["export"], task.metric), figures[task.metric], val_scores,
                f"runs:/{runs['train']}/{tracking.VAL_SCORES_ARTIFACT}", run.info.run_id, params.tracking.promotion,
                params.seed, params.tracking.global_models[task.name], task.metric)
    mlflow_view.share(params, [d for d, keys in splits["test"].items() if keys])  # the UI's view of these rows
    record = {"run_id": run.info.run_id, "model_uri": model_uri, **registered}
    write_json(files.registered, record)
    log.info("%s: registered %s", method, {k: v for k, v in registered.items() if k in ("version", "champion", "reused")})
    return record


if __name__ == "__main__":
    method_main(__doc__, run)
