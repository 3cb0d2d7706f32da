"""Stage 6, evaluate@<method>: every test set scored, with summaries, curves, drawn cases and explanations.

``method`` is a trained method, scored by its task (:mod:`polypflow.tasks`: a segmenter's Dice/IoU at 0.5 and at
its threshold, the toolbox's meanDic/meanIoU/S-measure/E-measure/weighted F, MAE, AUC-ROC, and its mask's
components as boxes; a detector's COCO AP/AP50/AP75/AR100 and box F1), or an ``external`` method whose
published prediction maps are scored exactly like a segmenter's, on the test images they cover. Test sets come
from ``splits.json`` (:func:`polypflow.evaluate.runner.evaluate_test_sets`, the one test-set loop), scored at the
masks' original resolution. Writes ``artifacts/eval/<method>/``: ``per_image.csv``, ``summary.json`` (per test
set), ``pr.csv``, ``sweep.csv``, ``curves.csv``, ``cases/`` (best and worst ``evaluate.cases`` images per test
set; ``cases.csv``; the film strip of each test set's least stable video sequence), ``stability.csv`` (flicker
and false alarms per video sequence, raw and with the model's smoothing) and ``gradcam/`` panels (a segmenter's); its MLflow run logs the test metrics and the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from polypflow.data.images import read_facts, read_splits
from polypflow.evaluate.runner import Source, evaluate_test_sets
from polypflow.infer.device import resolve_device
from polypflow.infer.temporal import Smoothing
from polypflow.io import read_json, write_json
from polypflow.settings.config import ExternalMethod, Params
from polypflow.settings.layout import method_layout
from polypflow.tasks import task_of
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.track import runs as tracking
from polypflow.train.checkpoint import load_trained
from stages._cli import method_main

log = logging.getLogger(__name__)


def read_map(path: Path) -> np.ndarray:
    """A grey 8-bit probability map (the toolbox's PNG) as float32 in [0, 1]; an error names the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode prediction map ({exc})") from exc


def external_maps(spec: ExternalMethod) -> Source:
    """An external method's maps, ``<root>/<folder>/<id>.png``; images without a map are left out."""

    def maps(dataset: str, keys: list[str]) -> tuple[list[str], list[np.ndarray]]:
        if dataset not in spec.folders:
            return [], []
        folder = Path(spec.root) / spec.folders[dataset]
        paths = {key: folder / f"{key.split('/', 1)[1]}.png" for key in keys}
        found = [key for key in keys if paths[key].is_file()]
        return found, [read_map(paths[key]) for key in found]

    return maps


def log_run(params: Params, name: str, summary: dict, out: Path, splits: dict, parent_run_id: str | None = None,
            tags: dict[str, str] | None = None) -> str:
    """The evaluate run: test metrics, the test sets as dataset inputs, the evaluation folder; returns its id."""
    flat = {f"test.{d}.{k}": v for d, m in summary.items() for k, v in m.items()
            if k not in ("n", "protocol") and isinstance(v, (int, float))}
    with tracking.stage_run(params, "evaluate", name, parent_run_id=parent_run_id, tags=tags) as run:
        mlflow.log_metrics(flat)
        tracking.log_image_sets(params, {f"testing.{d}": splits["test"][d] for d in summary})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
    return run.info.run_id


def run(params: Params, method: str) -> dict:
    """Evaluate ``method`` (trained, or ``external``) on every test set; write its evaluation folder."""
    files, splits, facts = method_layout(params, method), read_splits(params), read_facts(params)
    if method in params.external:
        spec = params.external[method]
        if not Path(spec.root).is_dir():
            raise FileNotFoundError(f"{spec.root}: no such folder (external.{method}.root)")
        task, source, threshold, parent = SegmentationTask(params), external_maps(spec), spec.threshold, None
        smoothing = Smoothing()
        tags, nothing = {"polypflow.external": spec.title}, f"external.{method}: no map in {spec.root}"
    else:
        parent = read_json(files.run_record("train"))["run_id"]
        tracking.require_run(params, parent, files.run_record("train"))  # before the work, not after it
        model, meta = load_trained(files.model)
        task, threshold, tags, nothing = task_of(meta["arch"])(params), meta["threshold"], None, f"{method}: no prediction"
        predictor = task.predictor(model, meta, device=resolve_device(params.device), batch_size=params.evaluate.batch_size)
        source, smoothing = task.test_source(predictor, meta, facts), Smoothing.of(meta)
    summary = evaluate_test_sets(source, task.scorer(threshold, facts, files.cases_dir, smoothing), splits, files, task.case_columns)
    if not summary:
        raise ValueError(f"{nothing} matches a test image of {params.paths.splits}")
    if method not in params.external:
        first = next(keys for keys in splits["test"].values() if keys)
        log.info("%d explanations in %s", len(task.explain(model, meta, facts, first, files.gradcam_dir)), files.gradcam_dir)
    write_json(files.eval_summary, summary)
    write_json(files.run_record("evaluate"), {"run_id": log_run(params, method, summary, files.eval_dir, splits, parent, tags)})
    return summary


if __name__ == "__main__":
    method_main(__doc__, run)
