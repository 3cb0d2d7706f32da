"""Segment a folder of images with a trained model: masks (PNG 0/255) and overlays; or, with a detector, boxes.

    python -m polypflow.predict --model models:/polyp-segmenter@champion --input DIR --output DIR
    python -m polypflow.predict --model artifacts/export/unet/model.onnx --input DIR --output DIR

``--model`` is an MLflow model URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run>/model``), an ONNX file exported by ``export@<method>`` or a ``model.pt`` written by
``train@<method>``. Each is run by :class:`polypflow.inference.Predictor`, the predictor evaluation and serving
use: the image is resized to the model's input size, predicted, and the map resized back to the image's own
resolution; pixels with probability >= the threshold are polyp. The threshold is ``--threshold`` if given, else
the registered version's ``threshold`` tag (MLflow registry URIs) or the checkpoint's, else 0.5.

The MLflow store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` of the project's
params.yaml (the first one found from the current folder upwards, else beside this package), relative paths
taken from that project's folder. A store that does not exist is an error, never created.

Images must decode, have 3 channels and sides within ``validate.min_side``..``validate.max_side`` of that
params.yaml (64..4096 without one; ``--min-side``/``--max-side`` override): any other file is skipped with one
line saying why. Writes ``OUTPUT/masks/<stem>.png`` (0/255), ``OUTPUT/overlays/<stem>.png`` (prediction in red
over the image, with its outline), each file atomically, and at the end ``OUTPUT/predictions.csv`` (image,
polyp fraction, max probability) of the images segmented. Exit status: 0 all segmented; 1 nothing done (a
user error, one line); 3 done, but some files skipped.

A detection method's model (its ``model.pt`` or MLflow model; its ONNX graph leaves NMS to the caller) draws its
boxes instead: ``OUTPUT/overlays/<stem>.png`` with every box scoring at least the threshold (``--threshold``, else
the model's ``detection.match_score``) in red with its score, and ``predictions.csv`` (image, number of boxes,
highest score, the boxes as JSON ``[[x1, y1, x2, y2, score], ...]`` in the image's pixels). A frame without a
polyp gets no box, not an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from polypflow.config import Params, ParamsError, load_params
from polypflow.inference import ImageError, OnnxBackend, Predictor, SizeLimits, TorchBackend, decode_image
from polypflow.io import atomic_path, write_png

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
PRED_COLOUR, TRUTH_COLOUR = (255, 40, 40), (40, 255, 40)
EXIT_ERROR, EXIT_SKIPPED = 1, 3


def onnx_segmenter(path: Path, threshold: float | None) -> Predictor:
    from polypflow.onnx_export import onnx_session

    session = onnx_session(path)
    if len(session.get_outputs()) != 1:
        raise ValueError(f"{path}: a detector's graph (boxes and scores before NMS); predict with its model.pt or "
                         "its MLflow model, which run the NMS")
    spec = session.get_inputs()[0]
    size = spec.shape[-1]
    if not isinstance(size, int):
        raise ValueError(f"{path}: the ONNX input has no fixed spatial size ({spec.shape})")
    return Predictor(OnnxBackend(session), size, 0.5 if threshold is None else threshold, source=str(path))


def checkpoint_segmenter(path: Path, threshold: float | None):
    """The predictor of a ``model.pt``: a :class:`Predictor`, or a detector's ``BoxPredictor``."""
    from polypflow.inference import trained_predictor
    from polypflow.training import load_trained

    model, meta = load_trained(path)
    if meta.get("task") == "detection":
        from polypflow.detection.inference import trained_box_predictor

        return trained_box_predictor(model, meta, threshold, source=str(path))
    return trained_predictor(model, meta, threshold, source=str(path))


def registry_version(uri: str):
    """The model version a ``models:/name@alias`` or ``models:/name/version`` URI names (None for other URIs);
    a missing model, alias or version is a :class:`LookupError` saying what the store has instead."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

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


def mlflow_segmenter(uri: str, threshold: float | None):
    """The predictor of a logged :class:`polypflow.serving.PolypSegmenter` (or of an older pytorch-flavor model),
    or the box predictor of a :class:`polypflow.serving.PolypDetector`."""
    import mlflow

    from polypflow.serving import PolypDetector, PolypSegmenter

    version = registry_version(uri)
    tags = dict(version.tags) if version is not None else {}
    info = mlflow.models.get_model_info(uri)
    if "pytorch" in info.flavors:
        return legacy_torch_segmenter(uri, info, tags, threshold)
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if isinstance(model, PolypDetector):
        chosen = threshold if threshold is not None else float(tags.get("threshold", model.predictor.match_score))
        return replace(model.predictor, match_score=chosen, source=uri)
    if not isinstance(model, PolypSegmenter):
        raise ValueError(f"{uri}: not a polypflow model ({type(model).__name__})")
    chosen = threshold if threshold is not None else float(tags.get("threshold", model.predictor.threshold))
    return replace(model.predictor, threshold=chosen, source=uri)


def load_segmenter(model: str, threshold: float | None = None):
    """The :class:`~polypflow.inference.Predictor` of an ONNX file, a ``model.pt`` checkpoint or an MLflow model URI
    (a detector's: its :class:`~polypflow.detection.inference.BoxPredictor`)."""
    path = Path(model)
    if model.endswith((".onnx", ".pt")) and not path.is_file():
        raise FileNotFoundError(f"--model {model}: no such file")
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


def segment_file(predictor: Predictor, path: Path, output_dir: Path, limits: SizeLimits) -> dict:
    """Mask and overlay of one image file, each written atomically; its row of ``predictions.csv``."""
    image = decode_image(path.read_bytes(), limits)
    prob = predictor.predict([image])[0]
    pred = predictor.mask(prob)
    write_png(output_dir / "masks" / f"{path.stem}.png", pred.astype(np.uint8) * 255)
    write_png(output_dir / "overlays" / f"{path.stem}.png", draw_overlay(image, pred))
    return {"image": path.name, "polyp_fraction": float(pred.mean()), "max_probability": float(prob.max())}


def detect_file(predictor, path: Path, output_dir: Path, limits: SizeLimits) -> dict:
    """A detector's boxes on one image file, drawn (overlay written atomically); its row of ``predictions.csv``."""
    import json

    import torch

    from polypflow.detection.evaluate import draw_boxes

    image = decode_image(path.read_bytes(), limits)
    found = predictor.found(predictor.detect([image])[0])
    write_png(output_dir / "overlays" / f"{path.stem}.png",
              draw_boxes(image, torch.zeros(0, 4), found, predictor.match_score))
    boxes = [[round(v, 2) for v in box] + [round(score, 4)]
             for box, score in zip(found.boxes.tolist(), found.scores.tolist(), strict=True)]
    return {"image": path.name, "n_boxes": len(boxes), "max_score": max((b[-1] for b in boxes), default=0.0),
            "boxes": json.dumps(boxes)}


def run(model: str, input_dir: Path | str, output_dir: Path | str, threshold: float | None = None,
        limits: SizeLimits = SizeLimits()) -> tuple[pd.DataFrame, dict[str, str]]:
    """Segment every image in ``input_dir``; write masks, overlays and ``predictions.csv``. Returns the table and
    the files skipped, each with the reason."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir}: no such folder")
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{input_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    predictor = load_segmenter(model, threshold)
    detector = not isinstance(predictor, Predictor)
    one_file, columns = ((detect_file, ["image", "n_boxes", "max_score", "boxes"]) if detector else
                         (segment_file, ["image", "polyp_fraction", "max_probability"]))
    rows, skipped = [], {}
    for path in files:
        try:
            rows.append(one_file(predictor, path, output_dir, limits))
        except (ImageError, OSError) as exc:
            skipped[path.name] = str(exc)
            log.warning("skipped %s: %s", path, exc)
    table = pd.DataFrame(rows, columns=columns)
    with atomic_path(output_dir / "predictions.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    log.info("%d of %d images %s with %s (threshold %.3f) -> %s%s", len(rows), len(files),
             "searched for polyps" if detector else "segmented", predictor.source,
             predictor.match_score if detector else predictor.threshold, output_dir,
             f"; {len(skipped)} skipped" if skipped else "")
    return table, skipped


def find_project(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding a params.yaml."""
    return next((folder for folder in (start, *start.parents) if (folder / "params.yaml").is_file()), None)


def project_params() -> tuple[Path, Params] | None:
    """The project (its folder and params) around the current folder, else around this package."""
    root = find_project(Path.cwd().resolve()) or find_project(Path(__file__).resolve().parent)
    return (root, load_params(root / "params.yaml")) if root is not None else None


def local_store(uri: str, root: Path | None = None) -> Path | None:
    """The file or folder of a local MLflow store URI (relative ones against ``root``); None for a server."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file:"):
        path = Path(re.sub(r"^file:(//)?", "", uri))
    elif "://" not in uri:
        path = Path(uri)
    else:
        return None
    return path if path.is_absolute() or root is None else root / path


def configure_tracking(uri: str | None, project: tuple[Path, Params] | None) -> str:
    """Point MLflow at the flag's store, else the environment's, else the project's; never create one."""
    import mlflow

    root = None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if project is None:
            raise FileNotFoundError(f"no MLflow store: no params.yaml in {Path.cwd()} or above; "
                                    "pass --tracking-uri or set MLFLOW_TRACKING_URI")
        root, uri = project[0], project[1].tracking.uri
    store = local_store(uri, root)
    if store is not None and not store.exists():
        where = f" (tracking.uri of {root / 'params.yaml'})" if root else ""
        raise FileNotFoundError(f"no MLflow store at {store}{where}: train a model first (dvc repro), or pass "
                                "--tracking-uri")
    if store is not None and uri.startswith("sqlite:///"):
        uri = f"sqlite:///{store}"
    mlflow.set_tracking_uri(uri)
    return uri


def size_limits(args: argparse.Namespace, project: tuple[Path, Params] | None) -> SizeLimits:
    known = SizeLimits(project[1].validate_.min_side, project[1].validate_.max_side) if project else SizeLimits()
    return SizeLimits(args.min_side or known.min_side, args.max_side or known.max_side)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Segment a folder of images: masks (PNG 0/255) and overlays.")
    p.add_argument("--model", required=True, help="models:/<name>@champion, models:/<name>/<v>, runs:/..., x.onnx, model.pt")
    p.add_argument("--input", required=True, type=Path, help="folder of images")
    p.add_argument("--output", required=True, type=Path, help="folder for masks/, overlays/, predictions.csv")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's registered threshold, else 0.5")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else tracking.uri of the project's params.yaml)")
    p.add_argument("--min-side", type=int, default=None, help="refuse smaller images (default: validate.min_side)")
    p.add_argument("--max-side", type=int, default=None, help="refuse larger images (default: validate.max_side)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        project = project_params()
        if not args.model.endswith((".onnx", ".pt")):
            configure_tracking(args.tracking_uri, project)
        _, skipped = run(args.model, args.input, args.output, args.threshold, size_limits(args, project))
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except (ParamsError, LookupError, OSError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow"):
            raise
        log.error("MLflow: %s", exc)
        sys.exit(EXIT_ERROR)
    if skipped:
        log.error("%d file(s) skipped: %s", len(skipped), ", ".join(skipped))
        sys.exit(EXIT_SKIPPED)


if __name__ == "__main__":
    main()
