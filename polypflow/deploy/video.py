"""Predict on a video: a file FFmpeg reads (through PyAV, whose wheel ships FFmpeg) or a folder of numbered frames.

    python -m polypflow.deploy.predict --model models:/polyp-segmenter@champion --input case.mp4 --output DIR
    python -m polypflow.deploy.predict --model ... --input frames/ --video --output DIR

Writes into ``DIR``: ``overlay.mp4`` (H.264: the prediction in red over each frame, or a detector's boxes),
``mask.mp4`` (a segmenter's: lossless H.264, grey 0/255, so every mask is exact), ``frames.csv`` (frame, time,
polyp fraction and max probability; a detector's boxes per frame) and ``summary.json`` (frames, FPS end to end,
and where a stream that broke stopped). Each file is written under a temporary name and renamed when complete.

A decoding thread runs ahead of inference (a bounded queue); frames are predicted ``video.batch_size`` at a time
by the model's :class:`~polypflow.infer.predictor.Predictor`, and go through the model's moving average in order
when it ships one on (``--smoothing``/``--no-smoothing`` override; :mod:`polypflow.infer.temporal`).

Bad input is one line (:class:`VideoError`): not a video, an empty file, a codec this FFmpeg cannot decode. A
stream that breaks part-way keeps the frames decoded before the break: the outputs are completed with them and the
summary says at which frame and why it stopped (:attr:`VideoResult.stopped`).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
from tqdm import tqdm

from polypflow.data.images import IMAGE_EXTENSIONS
from polypflow.infer.predictor import ImageError, Predictor, SizeLimits, decode_image
from polypflow.io import atomic_path, write_csv, write_json
from polypflow.tasks import Task

log = logging.getLogger(__name__)
FOLDER_RATE = Fraction(25)   # frames per second of a folder of frames' videos (it has no clock of its own)
AHEAD = 4                    # batches decoded ahead of inference
OVERLAY, MASK, TABLE, SUMMARY = "overlay.mp4", "mask.mp4", "frames.csv", "summary.json"


class VideoError(ValueError):
    """A video input that cannot be read at all."""


@dataclass(frozen=True)
class VideoResult:
    frames: int
    seconds: float            # wall time, decode + inference + encode
    fps: float                # frames / seconds
    rate: float               # the video's frame rate
    expected_frames: int | None
    stopped: str | None       # why decoding stopped before the end, at which frame; None when it read to the end
    smoothing: float | None   # the moving average's weight of the current frame, None when off


def is_video(path: Path) -> bool:
    """Whether ``--input`` names a video file rather than an image or a folder of images."""
    return path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS


# --- sources: frames in order, each RGB uint8 --------------------------------------------------------------------


class FileSource:
    """A video file's frames, decoded by FFmpeg; :attr:`stopped` says where and why a broken stream ended."""

    def __init__(self, path: Path) -> None:
        self.path, self.stopped = path, None
        if path.stat().st_size == 0:
            raise VideoError(f"{path}: empty file (0 bytes)")
        try:
            self.container = av.open(str(path))
        except av.error.FFmpegError as exc:
            raise VideoError(f"{path}: not a video FFmpeg can read ({exc.strerror or exc})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path}: no video stream (streams: {[s.type for s in self.container.streams]})")
        self.stream = self.container.streams.video[0]
        name = self.stream.codec_context.name if self.stream.codec_context else "none FFmpeg knows"
        if not name or name not in av.codecs_available:
            self.container.close()
            raise VideoError(f"{path}: codec {name!r} cannot be decoded by this FFmpeg (PyAV {av.__version__})")
        self.rate = Fraction(self.stream.average_rate or self.stream.guessed_rate or FOLDER_RATE)
        self.expected = self.stream.frames or self._frames_from_duration()

    def _frames_from_duration(self) -> int | None:
        if self.container.duration is None:
            return None
        return round(self.container.duration / av.time_base * self.rate)

    def __iter__(self) -> Iterator[np.ndarray]:
        count = 0
        try:
            for frame in self.container.decode(self.stream):
                count += 1
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            self.stopped = f"stream broke after frame {count}: {exc.strerror or exc}"
        finally:
            self.container.close()
        if self.stopped is None and self.expected and count < self.expected - 1:
            self.stopped = f"stream ended after frame {count} of the {self.expected} its header announces"


class FolderSource:
    """A folder of numbered frames (``frame_0001.png``, ``12.jpg``: the last number in the name orders them)."""

    def __init__(self, folder: Path, limits: SizeLimits) -> None:
        numbered = []
        for path in folder.iterdir():
            digits = re.findall(r"\d+", path.stem)
            if path.suffix.lower() in IMAGE_EXTENSIONS and digits:
                numbered.append((int(digits[-1]), path))
        if not numbered:
            raise VideoError(f"{folder}: no numbered frames ({', '.join(sorted(IMAGE_EXTENSIONS))} with a number in the name)")
        numbers = [n for n, _ in numbered]
        if len(set(numbers)) < len(numbers):
            raise VideoError(f"{folder}: two frames share a number; one number per frame")
        self.paths = [p for _, p in sorted(numbered)]
        self.limits, self.rate, self.expected, self.stopped = limits, FOLDER_RATE, len(self.paths), None

    def __iter__(self) -> Iterator[np.ndarray]:
        for count, path in enumerate(self.paths):
            try:
                yield decode_image(path.read_bytes(), self.limits)
            except (ImageError, OSError) as exc:
                self.stopped = f"{path.name} (frame {count + 1}): {exc}"
                return


def read_ahead(source, batch: int) -> Iterator[list[np.ndarray]]:
    """``source``'s frames in batches, decoded by a thread that keeps up to :data:`AHEAD` batches ready."""
    ready: queue.Queue = queue.Queue(maxsize=AHEAD)
    done, failure = object(), []

    def decode() -> None:
        try:
            chunk = []
            for frame in source:
                chunk.append(frame)
                if len(chunk) == batch:
                    ready.put(chunk)
                    chunk = []
            if chunk:
                ready.put(chunk)
        except BaseException as exc:  # handed to the reading thread, raised there
            failure.append(exc)
        finally:
            ready.put(done)

    thread = threading.Thread(target=decode, name="video-decode", daemon=True)
    thread.start()
    while (item := ready.get()) is not done:
        yield item
    thread.join()
    if failure:
        raise failure[0]


# --- sinks ---------------------------------------------------------------------------------------------------------


class Encoder:
    """An H.264 stream written to ``path`` (frames of one size; odd sides padded by one pixel, as yuv420p needs):
    ``overlay`` RGB in yuv420p, or lossless grey masks."""

    def __init__(self, path: Path, rate: Fraction, lossless_grey: bool = False) -> None:
        self.path, self.rate, self.grey = path, rate, lossless_grey
        self.container = self.stream = None

    def _open(self, height: int, width: int) -> None:
        self.container = av.open(str(self.path), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=self.rate)
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "gray" if self.grey else "yuv420p"
        self.stream.options = {"qp": "0", "preset": "veryfast"} if self.grey else {"crf": "20", "preset": "veryfast"}

    def write(self, image: np.ndarray) -> None:
        if self.container is None:
            self._open(*image.shape[:2])
        pad = ((0, self.stream.height - image.shape[0]), (0, self.stream.width - image.shape[1]))
        image = np.pad(image, pad + ((0, 0),) * (image.ndim - 2), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="gray" if self.grey else "rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode())
            self.container.close()


# --- the run -------------------------------------------------------------------------------------------------------


def predict_video(task: type[Task], predictor: Predictor, source: Path, output_dir: Path, limits: SizeLimits,
                  folder: bool, batch: int, smoothing: bool | None = None) -> VideoResult:
    """Predict every frame of ``source`` (a video file, or with ``folder`` a folder of numbered frames) and write
    the videos, ``frames.csv`` and ``summary.json`` into ``output_dir``."""
    frames = FolderSource(source, limits) if folder else FileSource(source)
    stream, chosen, rows = predictor.stream(smoothing), predictor.smoothing_for(smoothing), []
    start = time.perf_counter()
    with ExitStack() as stack:
        overlay_path = stack.enter_context(atomic_path(output_dir / OVERLAY))
        mask_path = stack.enter_context(atomic_path(output_dir / MASK)) if task.predicts_masks else None
        overlay = Encoder(overlay_path, frames.rate)
        masks = Encoder(mask_path, frames.rate, lossless_grey=True) if mask_path else None
        with tqdm(total=frames.expected, unit="frame", desc=source.name) as bar:
            for chunk in read_ahead(frames, batch):
                for image, output in zip(chunk, predictor.predict(chunk, along=stream), strict=True):
                    row, drawn, mask = task.answer(predictor, image, predictor.threshold, output)
                    overlay.write(drawn)
                    if masks is not None:
                        masks.write(mask.astype(np.uint8) * 255)
                    rows.append({"frame": len(rows) + 1, "time_s": round(len(rows) / float(frames.rate), 4),
                                 **{k: v for k, v in row.items() if k in task.answer_columns}})
                bar.update(len(chunk))
        if not rows:
            raise VideoError(f"{source}: no frame could be decoded" + (f" ({frames.stopped})" if frames.stopped else ""))
        overlay.close()
        if masks is not None:
            masks.close()
    seconds = time.perf_counter() - start
    columns = ["frame", "time_s", *(c for c in task.answer_columns if c != "mask")]
    write_csv(output_dir / TABLE, pd.DataFrame(rows, columns=columns))
    result = VideoResult(len(rows), round(seconds, 3), round(len(rows) / seconds, 2), float(frames.rate),
                         frames.expected, frames.stopped, chosen.ema if chosen.active else None)
    write_json(output_dir / SUMMARY, {"input": str(source), "model": predictor.source,
                                      "threshold": predictor.threshold, **asdict(result)})
    log.info("%d frames in %.1f s: %.1f FPS end to end (decode + inference + encode) -> %s%s", result.frames,
             seconds, result.fps, output_dir, f"; stopped early: {result.stopped}" if result.stopped else "")
    return result
