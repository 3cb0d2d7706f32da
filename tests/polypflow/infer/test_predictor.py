"""The one predictor: the same numbers as the inference paths it replaced, one resizing rule, the input checks."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, method_entry
from polypflow.data.images import NORMALIZATION, to_tensor
from polypflow.infer.onnx import DeployGraph, probability
from polypflow.infer.predictor import (ImageError, MapBackend, Predictor, SizeLimits, TorchBackend, decode_image,
                                       to_resolution)
from polypflow.settings.config import load_params
from polypflow.tasks.segmentation import SegmentationTask, predict_probs
from tests.conftest import REPO, make_pair

CPU = torch.device("cpu")
MEAN, STD = NORMALIZATION["imagenet"]
META = {"image_size": 64, "mean": list(MEAN), "std": list(STD), "threshold": 0.4}
VALIDATE = load_params(REPO / "params.yaml").validate_
LIMITS = SizeLimits(VALIDATE.min_side, VALIDATE.max_side)  # what the CLI and the server refuse by default


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", **{**method_entry("unet").test_kwargs, "pretrained": "none"}).eval()


def frames(sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Synthetic polyp frames of the given (height, width)."""
    return [np.asarray(make_pair(300 + i, size=max(h, w))[0])[:h, :w] for i, (h, w) in enumerate(sizes)]


@torch.no_grad()
def previous_validation_probs(model, images, normalize, device, batch_size=16, channels_last=False):
    """training.predict_probs as it was before the predictor (verbatim)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size], normalize).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)[0]
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def previous_predict_image(head, size, image):
    """predict.predict_image with a checkpoint's exported graph (normalisation and sigmoid inside) as it was before
    the predictor (verbatim)."""
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = np.ascontiguousarray(small.transpose(2, 0, 1)[None], dtype=np.float32) / 255
    with torch.no_grad():
        prob = head(torch.from_numpy(x)).numpy()[:, 0][0].astype(np.float32)
    return np.clip(cv2.resize(prob, image.shape[1::-1], interpolation=cv2.INTER_LINEAR), 0, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_validation_probabilities_are_unchanged(model, channels_last):
    images = np.stack(frames([(64, 64)] * 5))
    expected = previous_validation_probs(model, images, "imagenet", CPU, 2, channels_last)
    np.testing.assert_allclose(predict_probs(model, images, "imagenet", CPU, channels_last), expected,
                               rtol=0, atol=1e-6)
    batched = Predictor(TorchBackend(model, "imagenet", CPU, channels_last), 64, 0.5, batch_size=2)
    np.testing.assert_allclose(batched.predict_resized(images), expected, rtol=0, atol=1e-6)
    assert predict_probs(model, images[:0], "imagenet", CPU).shape == (0, 64, 64)


def test_predict_cli_maps_are_unchanged_and_come_back_at_the_image_resolution(model):
    head = DeployGraph(model, probability, MEAN, STD).eval()
    predictor = SegmentationTask.predictor(model, META)
    images = frames([(72, 96), (110, 150), (64, 64)])
    for image, prob in zip(images, predictor.predict(images), strict=True):
        assert prob.shape == image.shape[:2] and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
        np.testing.assert_allclose(prob, previous_predict_image(head, 64, image), rtol=0, atol=1e-6)
    assert predictor.threshold == 0.4 and SegmentationTask.predictor(model, META, threshold=0.7).threshold == 0.7


@pytest.mark.quick
def test_evaluation_resize_rule_is_unchanged():
    prob = np.random.default_rng(0).uniform(-0.2, 1.2, (64, 64)).astype(np.float32)
    gt_shape = (288, 384)
    previous = np.clip(cv2.resize(prob, gt_shape[::-1], interpolation=cv2.INTER_LINEAR), 0, 1)
    np.testing.assert_array_equal(to_resolution(prob, gt_shape), previous)


def test_one_image_or_a_batch_give_the_same_maps(model):
    predictor = SegmentationTask.predictor(model, META, batch_size=2)
    images = frames([(72, 96), (110, 150), (64, 64)])
    together = predictor.predict(images)
    for image, prob in zip(images, together, strict=True):
        np.testing.assert_allclose(predictor.predict([image])[0], prob, rtol=0, atol=1e-5)
    assert predictor.predict([]) == []


def test_backend_is_channels_last_when_asked(model):
    x = TorchBackend(model, "imagenet", CPU, channels_last=True).tensor(np.zeros((2, 64, 64, 3), np.uint8))
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.quick
def test_decode_accepts_rgb_png_and_jpeg():
    image = frames([(72, 96)])[0]
    np.testing.assert_array_equal(decode_image(encode(image), LIMITS), image)
    assert decode_image(encode(image, "JPEG"), LIMITS).shape == (72, 96, 3)


@pytest.mark.parametrize(("data", "reason"), [
    (b"definitely not an image", "not a decodable image"),
    (encode(np.zeros((1, 1, 3), np.uint8)), "1x1 pixels: each side must be 64..4096"),
    (encode(np.zeros((80, 63, 3), np.uint8)), "63x80 pixels"),
    (encode(np.zeros((80, 80, 2), np.uint8), mode="LA"), "expected 3 channels (RGB), found 2 (mode LA)"),
    (encode(np.zeros((80, 80), np.uint8)), "expected 3 channels (RGB), found 1 (mode L)"),
    (encode(np.zeros((80, 80, 4), np.uint8)), "expected 3 channels (RGB), found 4 (mode RGBA)"),
    (encode(np.zeros((64, 64, 3), np.uint8))[:60], "not a decodable image"),
])
@pytest.mark.quick
def test_decode_refuses_with_the_reason(data, reason):
    with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_image(data, LIMITS)


@pytest.mark.quick
def test_decode_size_limits_are_configurable():
    image = np.zeros((40, 5000, 3), np.uint8)
    with pytest.raises(ImageError, match="40..4096"):
        decode_image(encode(image), SizeLimits(40, 4096))
    assert decode_image(encode(image), SizeLimits(32, 5000)).shape == (40, 5000, 3)


@pytest.mark.quick
def test_predictor_probs_of_an_arbitrary_backend_batches():
    calls = []

    class RedBackend(MapBackend):
        def __call__(self, batch):
            calls.append(len(batch))
            return batch[..., 0].astype(np.float32) / 255

    images = np.full((5, 8, 8, 3), 51, np.uint8)
    predictor = Predictor(RedBackend(), 8, 0.3, batch_size=2)
    probs = predictor.predict_resized(images)
    assert calls == [2, 2, 1] and probs.shape == (5, 8, 8) and np.allclose(probs, 0.2)
    assert not predictor.keep(probs).any() and predictor.keep(probs, threshold=0.2).all()
