"""Segment a folder of images with a trained model: masks (PNG 0/255) and overlays; or, with a detector, boxes.

    python -m polypflow.deploy.predict --model models:/polyp-segmenter@champion --input DIR --output DIR
    python -m polypflow.deploy.predict --model artifacts/export/unet/model.onnx --input DIR --output DIR

``--model`` is an MLflow model URI (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run>/model``), an ONNX file exported by ``export@<method>`` or a ``model.pt`` written by
``train@<method>`` (:mod:`polypflow.deploy.load`). Each is run by :class:`polypflow.infer.predictor.Predictor`, the
predictor evaluation and serving use, and answered by its task (:mod:`polypflow.tasks`), as the server answers: the image is resized to the model's input size, predicted, and the map resized back to the image's own
resolution; pixels with probability >= the threshold are polyp. The threshold is ``--threshold`` if given, else
the registered version's ``threshold`` tag (MLflow registry URIs) or the checkpoint's, else 0.5.

The MLflow store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` of the project's
params.yaml (the first one found from the current folder upwards, else beside this package), relative paths
taken from that project's folder. A store that does not exist is an error, never created.

Images must decode, have 3 channels and sides within ``validate.min_side``..``validate.max_side`` of that
params.yaml (``--min-side``/``--max-side`` override): any other file is skipped with one
line saying why. Writes ``OUTPUT/masks/<stem>.png`` (0/255), ``OUTPUT/overlays/<stem>.png`` (prediction in red
over the image, with its outline), each file atomically, and at the end ``OUTPUT/predictions.csv`` (image,
polyp fraction, max probability) of the images segmented. Exit status: 0 all segmented; 1 nothing done (a
user error, one line); 3 done, but some files skipped.

A detection method's model (its ``model.pt`` or MLflow model; its ONNX graph leaves NMS to the caller) draws its
boxes instead: ``OUTPUT/overlays/<stem>.png`` with every box scoring at least the threshold (``--threshold``, else
the model's ``detection.match_score``) in red with its score, and ``predictions.csv`` (image, number of boxes,
highest score, the boxes as JSON ``[[x1, y1, x2, y2, score], ...]`` in the image's pixels). A frame without a
polyp gets no box, not an error.

``--input`` a video file (any container FFmpeg reads), or a folder of numbered frames with ``--video``, is
predicted frame by frame into videos (:mod:`polypflow.deploy.video`): ``overlay.mp4``, a segmenter's ``mask.mp4``,
``frames.csv`` and ``summary.json``; exit status 3 when the stream broke part-way (the frames before it are kept).

Otherwise ``--input`` is a folder of images or one image file. Two inputs with the same stem (``frame.jpg`` and
``frame.png``) would write the same mask: they are refused, named, before anything is written. A threshold
outside the task's range (a segmenter's (0, 1), a detector's [0, 1)) is refused as the server refuses it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from polypflow.data.images import IMAGE_EXTENSIONS
from polypflow.deploy.load import load_predictor
from polypflow.deploy.video import VideoResult, is_video, predict_video
from polypflow.infer.predictor import ImageError, SizeLimits, decode_image
from polypflow.io import write_csv, write_png
from polypflow.settings.config import Params, ParamsError
from polypflow.track.uri import nearest_project, use_existing_store

log = logging.getLogger(__name__)
EXIT_ERROR, EXIT_SKIPPED = 1, 3


def input_files(source: Path) -> list[Path]:
    """The images to predict: ``source`` itself if it is a file, else the images in the folder; same-stem inputs
    (whose outputs would overwrite each other) are refused, named."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{source}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    stems = defaultdict(list)
    for path in files:
        stems[path.stem].append(path.name)
    clashes = [" and ".join(names) for names in stems.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"{source}: inputs with the same name would write the same outputs: {'; '.join(clashes)} "
                         "(rename or move one of each)")
    return files


def run(model: str, source: Path | str, output_dir: Path | str, threshold: float | None,
        limits: SizeLimits) -> tuple[pd.DataFrame, dict[str, str]]:
    """Predict every image of ``source`` (a folder or one file); write overlays, masks (a segmenter's) and
    ``predictions.csv``. Returns the table and the files skipped, each with the reason."""
    files, output_dir = input_files(Path(source)), Path(output_dir)
    task, predictor = load_predictor(model, threshold)
    task.check_threshold(predictor.threshold)
    rows, skipped = [], {}
    for path in files:
        try:
            image = decode_image(path.read_bytes(), limits)
        except (ImageError, OSError) as exc:
            skipped[path.name] = str(exc)
            log.warning("skipped %s: %s", path, exc)
            continue
        row, overlay, mask = task.answer(predictor, image, predictor.threshold)
        if mask is not None:
            write_png(output_dir / "masks" / f"{path.stem}.png", mask.astype(np.uint8) * 255)
        write_png(output_dir / "overlays" / f"{path.stem}.png", overlay)
        rows.append({"image": path.name, **{k: v for k, v in row.items() if k in task.answer_columns}})
    columns = ["image", *(c for c in task.answer_columns if c != "mask")]
    table = pd.DataFrame(rows, columns=columns)
    write_csv(output_dir / "predictions.csv", table)
    log.info("%d of %d images predicted (%s) with %s (threshold %.3f) -> %s%s", len(rows), len(files), task.name,
             predictor.source, predictor.threshold, output_dir, f"; {len(skipped)} skipped" if skipped else "")
    return table, skipped


def run_video(args: argparse.Namespace, project: tuple[Path, Params] | None, limits: SizeLimits) -> VideoResult:
    """``--input`` as one video (a file, or ``--video``'s folder of numbered frames)."""
    if args.video and not args.input.is_dir():
        raise FileNotFoundError(f"--input {args.input}: --video expects a folder of numbered frames")
    if project is None:
        raise ParamsError("no params.yaml found for video.batch_size")
    task, predictor = load_predictor(args.model, args.threshold)
    task.check_threshold(predictor.threshold)
    return predict_video(task, predictor, args.input, args.output, limits, args.video, project[1].video.batch_size,
                         args.smoothing)


def size_limits(args: argparse.Namespace, project: tuple[Path, Params] | None) -> SizeLimits:
    """``--min-side``/``--max-side``, else ``validate.min_side``/``max_side`` of the project's settings."""
    if project is None and not (args.min_side and args.max_side):
        raise ParamsError("no params.yaml found for validate.min_side/max_side: pass --min-side and --max-side")
    known = project[1].validate_ if project is not None else None
    return SizeLimits(args.min_side or known.min_side, args.max_side or known.max_side)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Predict polyps in images: masks (PNG 0/255) and overlays, or boxes.")
    p.add_argument("--model", required=True, help="models:/<name>@champion, models:/<name>/<v>, runs:/..., x.onnx, model.pt")
    p.add_argument("--input", required=True, type=Path, help="a folder of images, one image, or a video file")
    p.add_argument("--output", required=True, type=Path, help="folder for masks/, overlays/, predictions.csv")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's registered threshold")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else tracking.uri of the project's params.yaml)")
    p.add_argument("--video", action="store_true", help="--input is a folder of numbered frames of one video")
    p.add_argument("--smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="a video's moving average over frames (default: as the model ships it, params video.smoothing)")
    p.add_argument("--min-side", type=int, default=None, help="refuse smaller images (default: validate.min_side)")
    p.add_argument("--max-side", type=int, default=None, help="refuse larger images (default: validate.max_side)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        project = nearest_project()
        if not args.model.endswith((".onnx", ".pt")):
            use_existing_store(args.tracking_uri, project)
        limits = size_limits(args, project)
        if args.video or is_video(args.input):
            stopped = run_video(args, project, limits).stopped
            if stopped:
                log.error("%s: %s; the outputs hold the frames before it", args.input, stopped)
                sys.exit(EXIT_SKIPPED)
            return
        else:
            _, skipped = run(args.model, args.input, args.output, args.threshold, limits)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except (ParamsError, LookupError, OSError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(EXIT_ERROR)
    except MlflowException as exc:
        log.error("MLflow: %s", exc)
        sys.exit(EXIT_ERROR)
    if skipped:
        log.error("%d file(s) skipped: %s", len(skipped), ", ".join(skipped))
        sys.exit(EXIT_SKIPPED)


if __name__ == "__main__":
    main()
