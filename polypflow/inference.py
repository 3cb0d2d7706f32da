"""The one predictor (as nnU-Net has one): validation, evaluation, the predict CLI, serving and Grad-CAM all
run a model through :class:`Predictor`.

One resizing rule: an image goes to the model's input size with area interpolation
(:func:`polypflow.data.resize_image`, as the training cache does), and a probability map comes back to the
image's (or its mask's) resolution bilinearly, clipped to [0, 1] (:func:`to_resolution`). One batch path: uint8
RGB batches at the model's size, normalised, channels-last when asked, bf16 autocast on CUDA, sigmoid of the
main map (:class:`TorchBackend`). An exported ONNX graph, which holds the normalisation and the sigmoid itself,
is the other backend (:class:`OnnxBackend`) of the same predictor.

Images from outside the pipeline (the CLI's files, the server's requests) are decoded by :func:`decode_image`,
which refuses what the pipeline would not train on: undecodable bytes, anything but 3 channels, a side outside
``validate.min_side``..``validate.max_side``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from polypflow.data import resize_image, to_tensor

CPU = torch.device("cpu")
Normalize = str | tuple[Sequence[float], Sequence[float]]


class ImageError(ValueError):
    """An input image the predictor refuses: undecodable, not 3 channels, or a side out of bounds."""


@dataclass(frozen=True)
class SizeLimits:
    """Accepted image sides in pixels: ``validate.min_side``/``max_side`` of params.yaml (these are its values)."""

    min_side: int = 64
    max_side: int = 4096


def decode_image(data: bytes, limits: SizeLimits = SizeLimits()) -> np.ndarray:
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


class TorchBackend:
    """A registry model (a tuple of logit maps, main map first) as a function of uint8 RGB batches; the model
    is put in eval mode."""

    def __init__(self, model: nn.Module, normalize: Normalize, device: torch.device = CPU,
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
        return torch.sigmoid(logits.float())[:, 0].cpu().numpy()


class OnnxBackend:
    """An exported graph (``polypflow.onnx_export``: RGB in [0, 1] in, probability out) on ONNX Runtime."""

    def __init__(self, session) -> None:
        self.session, self.input = session, session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255
        return self.session.run(None, {self.input: x})[0][:, 0]


@dataclass
class Predictor:
    """A model as probability maps: ``backend`` maps uint8 N×S×S×3 at ``image_size`` to N×S×S probabilities;
    pixels with probability >= ``threshold`` are polyp."""

    backend: Callable[[np.ndarray], np.ndarray]
    image_size: int
    threshold: float = 0.5
    batch_size: int = 16
    source: str = ""

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Main-map probabilities (N×S×S float32) of uint8 RGB images already at the model's size (N×S×S×3)."""
        out = [self.backend(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, *images.shape[1:3]), np.float32)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probability maps (H×W float32 in [0, 1]) of uint8 RGB images of any size, each at its own resolution."""
        if not len(images):
            return []
        small = np.stack([resize_image(image, self.image_size) for image in images])
        return [to_resolution(prob, image.shape) for prob, image in zip(self.probs(small), images, strict=True)]

    def mask(self, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The binary polyp mask of a probability map (at ``threshold``, default the predictor's)."""
        return prob >= (self.threshold if threshold is None else threshold)


def trained_predictor(model: nn.Module, meta: dict, threshold: float | None = None, device: torch.device = CPU,
                      batch_size: int = 16, source: str = "") -> Predictor:
    """The predictor of a trained model and its metadata (``polypflow.training.save_trained``: image_size, mean,
    std, threshold); ``threshold`` overrides the stored one."""
    backend = TorchBackend(model.to(device), (meta["mean"], meta["std"]), device)
    chosen = meta["threshold"] if threshold is None else threshold
    return Predictor(backend, int(meta["image_size"]), float(chosen), batch_size, source)
