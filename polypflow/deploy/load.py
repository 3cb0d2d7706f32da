"""A model reference as its task and :class:`~polypflow.infer.predictor.Predictor`: an MLflow model URI
(``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run>/model``), a ``model.pt`` written by
``train@<method>``, or an ONNX file exported by ``export@<method>`` (a segmenter's: a detector's graph leaves NMS
to the caller). The threshold is the caller's, else the registered version's ``threshold`` tag (registry URIs),
else the model's own."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from polypflow.deploy.serving import PolypModel
from polypflow.infer.onnx import onnx_session
from polypflow.infer.predictor import OnnxBackend, Predictor
from polypflow.tasks import Task, task_of
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.train.checkpoint import load_trained


def onnx_predictor(path: Path, threshold: float | None) -> tuple[type[Task], Predictor]:
    """An exported segmenter graph on ONNX Runtime (its input size is fixed in the graph)."""
    session = onnx_session(path)
    outputs = tuple(o.name for o in session.get_outputs())
    if outputs != SegmentationTask.onnx_outputs:
        raise ValueError(f"{path}: a graph with outputs {list(outputs)} (a detector's boxes and scores before NMS?); "
                         "predict with its model.pt or its MLflow model, which run the NMS")
    spec = session.get_inputs()[0]
    size = spec.shape[-1]
    if not isinstance(size, int):
        raise ValueError(f"{path}: the ONNX input has no fixed spatial size ({spec.shape})")
    return SegmentationTask, Predictor(OnnxBackend(session), size, 0.5 if threshold is None else threshold, source=str(path))


def checkpoint_predictor(path: Path, threshold: float | None) -> tuple[type[Task], Predictor]:
    model, meta = load_trained(path)
    task = task_of(meta["arch"])
    return task, task.predictor(model, meta, threshold, source=str(path))


def registry_version(uri: str) -> ModelVersion | None:
    """The model version a ``models:/name@alias`` or ``models:/name/version`` URI names (None for other URIs);
    a missing model, alias or version is a :class:`LookupError` saying what the store has instead."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        return None
    name, alias, number = match.groups()
    client, store = MlflowClient(), mlflow.get_tracking_uri()
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=200))
        raise LookupError(f"{uri}: no registered model {name!r} in {store} "
                          f"(registered: {', '.join(names) or 'none'})") from None
    number = registered.aliases.get(alias) if alias else number
    if number is None:
        raise LookupError(f"{uri}: model {name!r} has no alias {alias!r} "
                          f"(aliases: {', '.join(sorted(registered.aliases)) or 'none'})")
    try:
        return client.get_model_version(name, str(number))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise LookupError(f"{uri}: model {name!r} has no version {number} "
                          f"(versions: {', '.join(map(str, versions)) or 'none'})") from None


def mlflow_predictor(uri: str, threshold: float | None) -> tuple[type[Task], Predictor]:
    """The predictor of a logged :class:`~polypflow.deploy.serving.PolypModel`."""
    version = registry_version(uri)
    tags = dict(version.tags) if version is not None else {}
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, PolypModel):
        raise ValueError(f"{uri}: not a polypflow model ({type(model).__name__})")
    chosen = threshold if threshold is not None else float(tags.get("threshold", model.predictor.threshold))
    return model.task, replace(model.predictor, threshold=chosen, source=uri)


def load_predictor(model: str, threshold: float | None = None) -> tuple[type[Task], Predictor]:
    """The task and predictor of an ONNX file, a ``model.pt`` checkpoint or an MLflow model URI."""
    path = Path(model)
    if model.endswith((".onnx", ".pt")) and not path.is_file():
        raise FileNotFoundError(f"--model {model}: no such file")
    if model.endswith(".onnx"):
        return onnx_predictor(path, threshold)
    if model.endswith(".pt"):
        return checkpoint_predictor(path, threshold)
    if "://" in model or model.startswith("models:/") or model.startswith("runs:/") or path.is_dir():
        return mlflow_predictor(model, threshold)
    raise ValueError(f"--model {model!r}: expected an MLflow model URI, a .onnx file or a model.pt")
