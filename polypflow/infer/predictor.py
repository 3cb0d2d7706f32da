"""The one predictor (as nnU-Net has one), for masks and boxes: validation, evaluation, the predict CLI, serving
and Grad-CAM all run a model through :class:`Predictor`.

One resizing rule: an image goes to the model's input size with area interpolation
(:func:`polypflow.data.images.resize_image`, as the training cache does), and what the model predicts comes back
to the image's (or its mask's) resolution: a probability map bilinearly, clipped to [0, 1]
(:func:`to_resolution`); boxes scaled by width and height (:func:`to_image_scale`). The backend says what a model
predicts and how it comes back: a segmenter's main-map probability (:class:`TorchBackend`, or its exported ONNX
graph, which holds the normalisation and the sigmoid itself: :class:`OnnxBackend`), or a detector's boxes after
NMS (:class:`BoxBackend`, decoding with the settings it was trained with; its exported graph, which stops before
NMS: :class:`OnnxBoxBackend`).

Images from outside the pipeline (the CLI's files, the server's requests) are decoded by :func:`decode_image`,
which refuses what the pipeline would not train on: undecodable bytes, anything but 3 channels, a side outside
``validate.min_side``..``validate.max_side``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from models.gfl_atss import Detections, postprocess
from models.tta import scaled
from polypflow.data.images import resize_image, to_tensor
from polypflow.infer.device import CPU
from polypflow.infer.temporal import Smoothing

Normalization = str | tuple[Sequence[float], Sequence[float]]  # a name of data.images.NORMALIZATION, or (mean, std)


class ImageError(ValueError):
    """An input image the predictor refuses: undecodable, not 3 channels, or a side out of bounds."""


@dataclass(frozen=True)
class SizeLimits:
    """Accepted image sides in pixels: ``validate.min_side``/``max_side`` of params.yaml."""

    min_side: int
    max_side: int


def decode_image(data: bytes, limits: SizeLimits) -> np.ndarray:
    """RGB uint8 H×W×3 of an encoded image (PNG, JPEG, ...); :class:`ImageError` saying why it is refused."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            bands, (width, height) = img.getbands(), img.size
            if len(bands) != 3:
                raise ImageError(f"expected 3 channels (RGB), found {len(bands)} (mode {img.mode})")
            if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
                raise ImageError(f"{width}x{height} pixels: each side must be {limits.min_side}..{limits.max_side} "
                                 "(validate.min_side/max_side)")
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a decodable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's ways of saying "not an image"
        raise ImageError(f"not a decodable image ({exc})") from exc


def to_resolution(prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A probability map at ``shape`` (H, W): bilinear, clipped to [0, 1]."""
    return np.clip(cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)


def to_image_scale(detections: Detections, size: int, shape: tuple[int, ...]) -> Detections:
    """Boxes predicted at ``size``×``size`` in the coordinates of an image of ``shape`` (H, W, ...)."""
    factor = torch.tensor([shape[1] / size, shape[0] / size] * 2, dtype=torch.float32)
    return Detections(detections.boxes.float() * factor, detections.scores)


class MapBackend:
    """A backend whose outputs are probability maps (N×S×S float32)."""

    @staticmethod
    def join(parts: list[np.ndarray], images: np.ndarray) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, *images.shape[1:3]), np.float32)

    @staticmethod
    def at(prob: np.ndarray, size: int, shape: tuple[int, ...]) -> np.ndarray:
        return to_resolution(prob, shape)

    @staticmethod
    def keep(prob: np.ndarray, threshold: float) -> np.ndarray:
        """The binary polyp mask: pixels with probability >= ``threshold``."""
        return prob >= threshold


class TorchBackend(MapBackend):
    """A registry segmenter (a tuple of logit maps, main map first) as a function of uint8 RGB batches: the main
    map's probability at the model's temperature (``models.tta.temperature``); the model is put in eval mode."""

    def __init__(self, model: nn.Module, normalize: Normalization, device: torch.device = CPU,
                 channels_last: bool = False) -> None:
        self.model, self.normalize, self.device, self.channels_last = model.eval(), normalize, device, channels_last

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """The network's input for uint8 N×H×W×3: normalised float N×3×H×W on the device."""
        x = to_tensor(images, self.normalize).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.model.eval()
        x = self.tensor(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)[0]
        return torch.sigmoid(scaled(self.model, logits.float()))[:, 0].cpu().numpy()


def graph_input(images: np.ndarray) -> np.ndarray:
    """An exported graph's input for uint8 N×H×W×3: float32 N×3×H×W in [0, 1] (the graph normalises it)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


class OnnxBackend(MapBackend):
    """An exported segmenter graph (``polypflow.infer.onnx``: RGB in [0, 1] in, probability out) on ONNX Runtime."""

    def __init__(self, session) -> None:
        self.session, self.input = session, session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: graph_input(images)})[0][:, 0]


@dataclass(frozen=True)
class Decoding:
    """How a detector's outputs become boxes: ``detection.score_threshold``, ``nms_iou`` and ``max_detections``
    as the model was trained with (its metadata's ``decode``)."""

    score_threshold: float
    nms_iou: float
    max_detections: int


class BoxBackend:
    """A registry detector as a function of uint8 RGB batches: its :class:`Detections` (model-input pixels, on
    the CPU, best first) after decoding and NMS (fp32, as it was validated)."""

    def __init__(self, model: nn.Module, normalize: Normalization, decoding: Decoding, device: torch.device = CPU) -> None:
        self.model, self.normalize, self.decoding, self.device = model.eval(), normalize, decoding, device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[Detections]:
        self.model.eval()
        x = to_tensor(images, self.normalize).to(self.device)
        outputs = self.model(x)
        outputs = type(outputs)(*(tuple(o.float() for o in part) for part in outputs))
        d = self.decoding
        found = self.model.decode(outputs, tuple(x.shape[-2:]), d.score_threshold, d.nms_iou, d.max_detections)
        return [Detections(f.boxes.cpu(), f.scores.cpu()) for f in found]

    @staticmethod
    def join(parts: list[list[Detections]], images: np.ndarray) -> list[Detections]:
        return [d for part in parts for d in part]

    @staticmethod
    def at(detections: Detections, size: int, shape: tuple[int, ...]) -> Detections:
        return to_image_scale(detections, size, shape)

    @staticmethod
    def keep(detections: Detections, threshold: float) -> Detections:
        """The boxes that count as found: score >= ``threshold``."""
        keep = detections.scores >= threshold
        return Detections(detections.boxes[keep], detections.scores[keep])


class OnnxBoxBackend(BoxBackend):
    """An exported detector graph (``polypflow.infer.onnx``: RGB in [0, 1] in, every anchor's box and score out) on
    ONNX Runtime, then the NMS PyTorch predictions go through (``models.gfl_atss.postprocess``) with ``decoding``."""

    def __init__(self, session, decoding: Decoding) -> None:
        self.session, self.input, self.decoding = session, session.get_inputs()[0].name, decoding

    def __call__(self, images: np.ndarray) -> list[Detections]:
        boxes, scores = (torch.from_numpy(a) for a in self.session.run(None, {self.input: graph_input(images)}))
        d = self.decoding
        return [postprocess(b, s, d.score_threshold, d.nms_iou, d.max_detections) for b, s in zip(boxes, scores)]


class Backend(Protocol):
    """What :class:`Predictor` runs: uint8 N×S×S×3 at the model's size -> one output per image."""

    def __call__(self, images: np.ndarray) -> Any: ...
    def join(self, parts: list[Any], images: np.ndarray) -> Any: ...
    def at(self, output: Any, size: int, shape: tuple[int, ...]) -> Any: ...
    def keep(self, output: Any, threshold: float) -> Any: ...


@dataclass
class Predictor:
    """A model as per-image outputs (probability maps, or boxes): ``backend`` maps uint8 N×S×S×3 at ``image_size``
    to one output per image; :meth:`keep` applies ``threshold`` (a pixel's probability, a box's score)."""

    backend: Backend
    image_size: int
    threshold: float
    batch_size: int = 16
    source: str = ""
    smoothing: Smoothing = Smoothing()   # over consecutive frames (a segmenter's maps): :meth:`stream`

    def predict_resized(self, images: np.ndarray) -> Any:
        """The outputs of uint8 RGB images already at the model's size (N×S×S×3), in model-input pixels."""
        parts = [self.backend(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return self.backend.join(parts, images)

    def predict(self, images: Sequence[np.ndarray], along: Callable[[Any], Any] | None = None) -> list:
        """The outputs of uint8 RGB images of any size, each at its own resolution; ``along`` (a :meth:`stream`),
        when given, sees each output in order at the model's size before it is resized."""
        if not len(images):
            return []
        small = np.stack([resize_image(image, self.image_size) for image in images])
        outputs = self.predict_resized(small)
        return [self.backend.at(along(out) if along else out, self.image_size, image.shape)
                for out, image in zip(outputs, images, strict=True)]

    def smoothing_for(self, smoothing: bool | None = None) -> Smoothing:
        """The model's moving average, switched on or off by ``smoothing`` (None: as the model ships it)."""
        return self.smoothing if smoothing is None else replace(self.smoothing, enabled=smoothing)

    def stream(self, smoothing: bool | None = None) -> Callable[[Any], Any]:
        """What one video's outputs go through, frame after frame: :meth:`smoothing_for`'s moving average when it
        is active; else nothing."""
        chosen = self.smoothing_for(smoothing)
        return chosen.stream() if chosen.active else (lambda out: out)

    def keep(self, output: Any, threshold: float | None = None) -> Any:
        """What counts as polyp in ``output``: the mask of a map, the boxes scoring enough (default: the predictor's
        threshold)."""
        return self.backend.keep(output, self.threshold if threshold is None else threshold)


def trained_predictor(backend: Backend, meta: dict, threshold: float | None = None, batch_size: int = 16,
                      source: str = "") -> Predictor:
    """The predictor of a trained model's ``backend`` and its metadata (``image_size``, ``threshold``, a
    segmenter's ``smoothing``); ``threshold`` overrides the stored one."""
    chosen = meta["threshold"] if threshold is None else threshold
    return Predictor(backend, int(meta["image_size"]), float(chosen), batch_size, source, Smoothing.of(meta))
