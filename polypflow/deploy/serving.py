"""The registered model as an MLflow pyfunc (one class, :class:`PolypModel`, for every task): a base64 image in,
the task's answer out (a segmenter's polyp mask, a detector's boxes), through the one predictor.

``mlflow models serve -m models:/polyp-segmenter@champion --env-manager local`` answers ``POST /invocations``
with a string column ``image`` (base64 of a PNG/JPEG/... file; a ``data:image/...;base64,`` prefix and line
breaks are accepted), in any of MLflow's request formats, e.g.
``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``, ``{"dataframe_records": [{"image":
"<base64>"}]}`` or ``{"inputs": {"image": ["<base64>"]}}``, optionally with ``"params": {"threshold": 0.4}``.
A segmenter's answer per row is ``mask`` (base64 PNG, 0/255, at the image's own resolution), ``polyp_fraction``
and ``max_probability``: ``{"predictions": [{"mask": ..., "polyp_fraction": ..., "max_probability": ...}]}``; a
detector's is ``boxes`` (JSON ``[[x1, y1, x2, y2, score], ...]`` in the image's pixels, best first, scoring at
least the threshold), ``n_boxes`` and ``max_score``. Rows are predicted one by one, as
``python -m polypflow.deploy.predict`` does files, so the answers are the same. With ``"params": {"sequence":
true}`` the rows are consecutive frames of one video, answered in order through the model's moving average over
frames when it ships one on (``video.smoothing``), as ``predict --input video.mp4`` answers them.

A bad row (not base64, not an image, not 3 channels, a side outside ``validate.min_side``..``max_side``)
raises :class:`~mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``, which the scoring server
answers with HTTP 400 and the reason (a missing ``image`` column fails MLflow's own schema check, also 400).
A threshold outside the task's range is a 400 too
(the rule the predict CLI applies). The model's artifact is the training checkpoint (``model.pt``), so
``unwrap_python_model().predictor`` gives the same :class:`~polypflow.infer.predictor.Predictor` in Python.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image
from torch import nn

import models
import polypflow
from polypflow.infer.predictor import ImageError, Predictor, SizeLimits, decode_image
from polypflow.tasks import Task, task_of
from polypflow.train.checkpoint import load_trained, save_trained

IMAGE_COLUMN = "image"
CHECKPOINT = "checkpoint"  # the artifact's key: the training checkpoint (polypflow.train.checkpoint.save_trained)
REQUIREMENTS = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "albumentations",
                "opencv-python-headless", "pillow", "numpy", "pandas", "pydantic", "pyyaml", "torchmetrics",
                "pycocotools")


def bad_request(message: str) -> MlflowException:
    """What the scoring server turns into HTTP 400 with ``message`` (``ERROR_CODE_TO_HTTP_STATUS``)."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_row(row: int, value: Any, limits: SizeLimits) -> np.ndarray:
    """The RGB image of one request row, or a 400 naming the row and the reason."""
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"row {row}: column {IMAGE_COLUMN!r} must be a non-empty base64 string")
    text = "".join((value.partition(",")[2] if value.startswith("data:") else value).split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"row {row}: not base64 ({exc})") from None
    try:
        return decode_image(data, limits)
    except ImageError as exc:
        raise bad_request(f"row {row}: {exc}") from None


def png_base64(mask: np.ndarray) -> str:
    """A boolean mask as base64 of a PNG, 0/255."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class PolypModel(mlflow.pyfunc.PythonModel):
    """A trained checkpoint behind its task's :class:`~polypflow.infer.predictor.Predictor`, as an MLflow pyfunc."""

    def load_context(self, context: Any) -> None:
        model, meta = load_trained(Path(context.artifacts[CHECKPOINT]))
        self.task: type[Task] = task_of(meta["arch"])
        self.predictor: Predictor = self.task.predictor(model, meta, source=meta.get("method", ""))
        self.limits = SizeLimits(**context.model_config)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = float((params or {}).get("threshold", self.predictor.threshold))
        try:
            self.task.check_threshold(threshold)
        except ValueError as exc:
            raise bad_request(f"params.{exc}") from None
        if IMAGE_COLUMN not in model_input:
            raise bad_request(f"missing column {IMAGE_COLUMN!r} (got {list(model_input.columns)})")
        images = [decode_row(i, value, self.limits) for i, value in enumerate(model_input[IMAGE_COLUMN])]
        if (params or {}).get("sequence", False):  # consecutive frames of one video: the model's smoothing, in order
            outputs = self.predictor.predict(images, along=self.predictor.stream())
        else:  # one at a time, as the predict CLI does: the same answer to the pixel
            outputs = [self.predictor.predict([image])[0] for image in images]
        rows = []
        for image, output in zip(images, outputs, strict=True):
            row, _, mask = self.task.answer(self.predictor, image, threshold, output)
            rows.append({**row, **({"mask": png_base64(mask)} if mask is not None else {})})
        return pd.DataFrame(rows, columns=list(self.task.answer_columns))


def signature(task: type[Task], threshold: float) -> ModelSignature:
    """String column ``image`` in; the task's answer columns out; params ``threshold`` and ``sequence`` (the rows
    are consecutive frames of one video: the model's moving average over frames applies, when it ships one on)."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in task.answer_columns.items()]),
        params=ParamSchema([ParamSpec("threshold", "double", float(threshold)),
                            ParamSpec("sequence", "boolean", False)]),  # rows are one video's frames, in order
    )


def requirements() -> list[str]:
    """Pinned versions of what the model's code imports, as installed here."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(model: nn.Module, meta: dict, limits: SizeLimits, name: str = "model") -> Any:
    """Log ``model`` with its ``meta`` (what ``save_trained`` stores) as a :class:`PolypModel` in the active run,
    refusing images whose sides fall outside ``limits``; the code of ``models`` and ``polypflow`` travels with it.
    Returns MLflow's ``ModelInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        save_trained(checkpoint, model, **meta)
        return mlflow.pyfunc.log_model(
            name=name, python_model=PolypModel(), artifacts={CHECKPOINT: str(checkpoint)},
            signature=signature(task_of(meta["arch"]), meta["threshold"]), model_config=asdict(limits),
            code_paths=[str(Path(models.__file__).parent), str(Path(polypflow.__file__).parent)],
            pip_requirements=requirements(),
        )
