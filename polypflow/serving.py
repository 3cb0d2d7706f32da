"""The registered model as an MLflow pyfunc: a base64 image in, its polyp mask out, through the one predictor.

``mlflow models serve -m models:/polyp-segmenter@champion --env-manager local`` answers ``POST /invocations``
with a string column ``image`` (base64 of a PNG/JPEG/... file; a ``data:image/...;base64,`` prefix and line
breaks are accepted), in any of MLflow's request formats, e.g.
``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``, ``{"dataframe_records": [{"image":
"<base64>"}]}`` or ``{"inputs": {"image": ["<base64>"]}}``, optionally with ``"params": {"threshold": 0.4}``.
Each row's answer is ``mask`` (base64 PNG, 0/255, at the image's own resolution), ``polyp_fraction`` and
``max_probability``: ``{"predictions": [{"mask": ..., "polyp_fraction": ..., "max_probability": ...}]}``.
Rows are predicted one by one, as ``python -m polypflow.predict`` does files, so the masks are the same.

A bad row (not base64, not an image, not 3 channels, a side outside ``validate.min_side``..``max_side``)
raises :class:`~mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``, which the scoring server
answers with HTTP 400 and the reason (a missing ``image`` column fails MLflow's own schema check, also 400).
The model's artifact is the training checkpoint (``model.pt``), so ``unwrap_python_model().predictor`` gives
the same :class:`~polypflow.inference.Predictor` in Python.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
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
from polypflow.inference import ImageError, Predictor, SizeLimits, decode_image, trained_predictor
from polypflow.training import load_trained, save_trained

IMAGE_COLUMN = "image"
CHECKPOINT = "checkpoint"  # the artifact's key: the training checkpoint (polypflow.training.save_trained)
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


class PolypSegmenter(mlflow.pyfunc.PythonModel):
    """A trained checkpoint behind :class:`~polypflow.inference.Predictor`, as an MLflow pyfunc."""

    def load_context(self, context: Any) -> None:
        model, meta = load_trained(Path(context.artifacts[CHECKPOINT]))
        self.predictor: Predictor = trained_predictor(model, meta, source=meta.get("method", ""))
        self.limits = SizeLimits(**(context.model_config or {}))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = float((params or {}).get("threshold", self.predictor.threshold))
        if not 0 < threshold < 1:
            raise bad_request(f"params.threshold must be in (0, 1), got {threshold}")
        if IMAGE_COLUMN not in model_input:
            raise bad_request(f"missing column {IMAGE_COLUMN!r} (got {list(model_input.columns)})")
        images = [decode_row(i, value, self.limits) for i, value in enumerate(model_input[IMAGE_COLUMN])]
        rows = []
        for image in images:  # one at a time, as the predict CLI does: the same mask to the pixel
            prob = self.predictor.predict([image])[0]
            mask = self.predictor.mask(prob, threshold)
            rows.append({"mask": png_base64(mask), "polyp_fraction": float(mask.mean()),
                         "max_probability": float(prob.max())})
        return pd.DataFrame(rows, columns=["mask", "polyp_fraction", "max_probability"])


class PolypDetector(mlflow.pyfunc.PythonModel):
    """A trained detector's checkpoint behind :class:`~polypflow.detection.inference.BoxPredictor`, as an MLflow
    pyfunc: the same request as :class:`PolypSegmenter`; each row's answer is ``boxes`` (a JSON list of
    ``[x1, y1, x2, y2, score]`` in the image's pixels, best first, scoring at least ``params.threshold``, by default
    the model's ``detection.match_score``), ``n_boxes`` and ``max_score``."""

    def load_context(self, context: Any) -> None:
        from polypflow.detection.inference import trained_box_predictor

        model, meta = load_trained(Path(context.artifacts[CHECKPOINT]))
        self.predictor = trained_box_predictor(model, meta, source=meta.get("method", ""))
        self.limits = SizeLimits(**(context.model_config or {}))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = float((params or {}).get("threshold", self.predictor.match_score))
        if not 0 <= threshold < 1:
            raise bad_request(f"params.threshold must be in [0, 1), got {threshold}")
        if IMAGE_COLUMN not in model_input:
            raise bad_request(f"missing column {IMAGE_COLUMN!r} (got {list(model_input.columns)})")
        images = [decode_row(i, value, self.limits) for i, value in enumerate(model_input[IMAGE_COLUMN])]
        rows = []
        for image in images:  # one at a time, as the predict CLI does
            found = self.predictor.detect([image])[0]
            keep = found.scores >= threshold
            boxes = [[round(v, 2) for v in box] + [round(score, 4)]
                     for box, score in zip(found.boxes[keep].tolist(), found.scores[keep].tolist(), strict=True)]
            rows.append({"boxes": json.dumps(boxes), "n_boxes": len(boxes),
                         "max_score": float(found.scores.max()) if len(found.scores) else 0.0})
        return pd.DataFrame(rows, columns=["boxes", "n_boxes", "max_score"])


def detector_signature(threshold: float) -> ModelSignature:
    """String column ``image`` in; ``boxes`` (JSON), ``n_boxes``, ``max_score`` out; param ``threshold``."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "boxes"), ColSpec("long", "n_boxes"), ColSpec("double", "max_score")]),
        params=ParamSchema([ParamSpec("threshold", "double", float(threshold))]),
    )


def signature(threshold: float) -> ModelSignature:
    """String column ``image`` in; ``mask``, ``polyp_fraction``, ``max_probability`` out; param ``threshold``."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("double", "polyp_fraction"),
                        ColSpec("double", "max_probability")]),
        params=ParamSchema([ParamSpec("threshold", "double", float(threshold))]),
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


def log_model(model: nn.Module, meta: dict, limits: SizeLimits = SizeLimits(), name: str = "model",
              python_model: mlflow.pyfunc.PythonModel | None = None, model_signature: ModelSignature | None = None) -> Any:
    """Log ``model`` with its ``meta`` (what ``save_trained`` stores) as a :class:`PolypSegmenter` pyfunc (or
    ``python_model``) in the active run; the code of ``models`` and ``polypflow`` travels with it. Returns
    MLflow's ``ModelInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        save_trained(checkpoint, model, **meta)
        return mlflow.pyfunc.log_model(
            name=name, python_model=python_model or PolypSegmenter(), artifacts={CHECKPOINT: str(checkpoint)},
            signature=model_signature or signature(meta["threshold"]), model_config=asdict(limits),
            code_paths=[str(Path(models.__file__).parent), str(Path(polypflow.__file__).parent)],
            pip_requirements=requirements(),
        )


def log_detector(model: nn.Module, meta: dict, limits: SizeLimits = SizeLimits(), name: str = "model") -> Any:
    """:func:`log_model` for a trained detector: a :class:`PolypDetector` pyfunc (image in, boxes out)."""
    return log_model(model, meta, limits, name, PolypDetector(), detector_signature(meta["threshold"]))
