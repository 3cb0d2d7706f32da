"""Segment a folder of images with a trained model: masks (PNG 0/255) and overlays.

    python -m polypflow.predict --model models:/polyp-segmenter@champion --input DIR --output DIR
    python -m polypflow.predict --model artifacts/export/unet/model.onnx --input DIR --output DIR

``--model`` is an MLflow model URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run>/model``), an ONNX file exported by ``export@<method>`` or a ``model.pt`` written by
``train@<method>``. Every one of them takes RGB in [0, 1] at the model's input size (read from the
MLflow model, the ONNX graph or the checkpoint) and returns the polyp probability. Each is run by
:class:`polypflow.inference.Predictor`, the predictor evaluation and serving use: each image is resized to that
size, predicted, and the map resized back to the image's own resolution; pixels with
probability >= the threshold are polyp. The threshold is ``--threshold`` if given, else the registered
version's ``threshold`` tag (MLflow registry URIs) or the checkpoint's, else 0.5. The MLflow store is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ``./params.yaml``.

Writes ``OUTPUT/masks/<stem>.png`` (0/255), ``OUTPUT/overlays/<stem>.png`` (prediction in red over the
image, with its outline) and ``OUTPUT/predictions.csv`` (stem, polyp fraction, max probability).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from polypflow.data import read_image
from polypflow.inference import OnnxBackend, Predictor, TorchBackend
from polypflow.io import atomic_path, write_png

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
PRED_COLOUR, TRUTH_COLOUR = (255, 40, 40), (40, 255, 40)


def onnx_segmenter(path: Path, threshold: float | None) -> Predictor:
    from polypflow.onnx_export import onnx_session

    session = onnx_session(path)
    spec = session.get_inputs()[0]
    size = spec.shape[-1]
    if not isinstance(size, int):
        raise ValueError(f"{path}: the ONNX input has no fixed spatial size ({spec.shape})")
    return Predictor(OnnxBackend(session), size, 0.5 if threshold is None else threshold, source=str(path))


def checkpoint_segmenter(path: Path, threshold: float | None) -> Predictor:
    from polypflow.inference import trained_predictor
    from polypflow.training import load_trained

    model, meta = load_trained(path)
    return trained_predictor(model, meta, threshold, source=str(path))


def registry_tags(uri: str) -> dict[str, str]:
    """Tags of the model version a ``models:/name@alias`` or ``models:/name/version`` URI names."""
    from mlflow import MlflowClient

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        return {}
    name, alias, number = match.groups()
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    return dict(version.tags)


def legacy_torch_segmenter(uri: str, info, tags: dict[str, str], threshold: float | None) -> Predictor:
    """A version logged before the pyfunc: a pickled ``ProbabilityHead`` (pytorch flavor, tensor signature)."""
    import mlflow

    from polypflow.onnx_export import ProbabilityHead

    head = mlflow.pytorch.load_model(uri, map_location="cpu")
    if not isinstance(head, ProbabilityHead):
        raise ValueError(f"{uri}: a PyTorch model, but not polypflow's ({type(head).__name__})")
    size = info.signature.inputs.inputs[0].shape[-1] if info.signature is not None else int(tags.get("image_size", 0))
    if not size or size < 0:
        raise ValueError(f"{uri}: no input size in the model signature or the version's tags")
    backend = TorchBackend(head.model, (head.mean.flatten().tolist(), head.std.flatten().tolist()))
    chosen = threshold if threshold is not None else float(tags.get("threshold", 0.5))
    return Predictor(backend, int(size), chosen, source=uri)


def mlflow_segmenter(uri: str, threshold: float | None) -> Predictor:
    """The predictor of a logged :class:`polypflow.serving.PolypSegmenter` (or of an older pytorch-flavor model)."""
    import mlflow

    from polypflow.serving import PolypSegmenter

    tags = registry_tags(uri)
    info = mlflow.models.get_model_info(uri)
    if "pytorch" in info.flavors:
        return legacy_torch_segmenter(uri, info, tags, threshold)
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, PolypSegmenter):
        raise ValueError(f"{uri}: not a polypflow model ({type(model).__name__})")
    chosen = threshold if threshold is not None else float(tags.get("threshold", model.predictor.threshold))
    return replace(model.predictor, threshold=chosen, source=uri)


def load_segmenter(model: str, threshold: float | None = None) -> Predictor:
    """The :class:`~polypflow.inference.Predictor` of an ONNX file, a ``model.pt`` checkpoint or an MLflow model URI."""
    path = Path(model)
    if model.endswith(".onnx"):
        return onnx_segmenter(path, threshold)
    if model.endswith(".pt"):
        return checkpoint_segmenter(path, threshold)
    if "://" in model or model.startswith("models:/") or model.startswith("runs:/") or path.is_dir():
        return mlflow_segmenter(model, threshold)
    raise ValueError(f"--model {model!r}: expected an MLflow model URI, a .onnx file or a model.pt")


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a binary mask, ``width`` pixels thick."""
    mask = mask.astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return (cv2.dilate(mask, kernel) > 0) & ~(cv2.erode(mask, kernel) > 0)


def draw_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """The prediction filled in red (with its outline) over ``image``; ``truth``'s outline in green."""
    out = image.astype(np.float32).copy()
    fill = pred.astype(bool)
    out[fill] = (1 - alpha) * out[fill] + alpha * np.array(PRED_COLOUR, np.float32)
    out = out.astype(np.uint8)
    width = max(1, round(max(image.shape[:2]) / 250))
    out[outline(fill, width)] = PRED_COLOUR
    if truth is not None:
        out[outline(truth.astype(bool), width)] = TRUTH_COLOUR
    return out


def run(model: str, input_dir: Path | str, output_dir: Path | str, threshold: float | None = None) -> pd.DataFrame:
    """Segment every image in ``input_dir``; write masks, overlays and ``predictions.csv``."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{input_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    predictor = load_segmenter(model, threshold)
    rows = []
    for path in files:
        image = read_image(path)
        prob = predictor.predict([image])[0]
        pred = predictor.mask(prob)
        write_png(output_dir / "masks" / f"{path.stem}.png", pred.astype(np.uint8) * 255)
        write_png(output_dir / "overlays" / f"{path.stem}.png", draw_overlay(image, pred))
        rows.append({"image": path.name, "polyp_fraction": float(pred.mean()), "max_probability": float(prob.max())})
    table = pd.DataFrame(rows)
    with atomic_path(output_dir / "predictions.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    log.info("%d images segmented with %s (threshold %.3f) -> %s", len(rows), predictor.source, predictor.threshold, output_dir)
    return table


def configure_tracking(uri: str | None, params_file: Path = Path("params.yaml")) -> None:
    """MLflow store for registry URIs: the flag, else the environment, else ``params.yaml``."""
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    elif not os.environ.get("MLFLOW_TRACKING_URI") and params_file.exists():
        from polypflow.config import load_params
        from polypflow.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(load_params(params_file)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Segment a folder of images: masks (PNG 0/255) and overlays.")
    p.add_argument("--model", required=True, help="models:/<name>@champion, models:/<name>/<v>, runs:/..., x.onnx, model.pt")
    p.add_argument("--input", required=True, type=Path, help="folder of images")
    p.add_argument("--output", required=True, type=Path, help="folder for masks/, overlays/, predictions.csv")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's registered threshold, else 0.5")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else params.yaml)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.model.endswith((".onnx", ".pt"))):
        configure_tracking(args.tracking_uri)
    run(args.model, args.input, args.output, args.threshold)


if __name__ == "__main__":
    main()
