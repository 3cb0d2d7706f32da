"""Grad-CAM explanations for any registered method (PolypSeg-GradCAM, METHODS.md section 5).

The spatial sum of the main map's logits inside the predicted polyp mask is back-propagated to a
target layer (by default the last conv feeding the main head); channel weights are the pooled
gradients, the heatmap is the ReLU of the weighted sum (``pytorch_grad_cam.GradCAM``), upsampled to
the input and min-max scaled to [0, 1]. If nothing is predicted, the whole map's logits are summed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from torch import nn

from polypflow.infer.predictor import Normalization, Predictor, TorchBackend
from polypflow.io import write_png

class MainMap(nn.Module):
    """Exposes only the main logit map of a registry model (whose forward returns a tuple)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s train/eval mode and parameter gradients (Grad-CAM overwrites both)."""
    was_training = model.training
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        model.train(was_training)
        for param, grad in grads:
            param.grad = grad


def feeding_convs(model: nn.Module, image: torch.Tensor) -> list[nn.Conv2d]:
    """Conv layers (more than one output channel) whose output reaches the main map, in execution order."""
    executed: list[tuple[nn.Conv2d, torch.Tensor]] = []

    def record(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        executed.append((module, output))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels > 1]
    handles = [m.register_forward_hook(record) for m in convs]
    try:
        with torch.enable_grad():
            main = model(image)[0]
            grads = torch.autograd.grad(main.sum(), [out for _, out in executed], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return [module for (module, _), grad in zip(executed, grads, strict=True) if grad is not None]


def find_target_layer(model: nn.Module, path: str | None = None, image_size: int = 64) -> nn.Module:
    """The layer Grad-CAM explains: ``path`` (dotted), else the model's ``gradcam_target`` attribute,
    else the last conv layer (found by tracing a forward pass) whose output feeds the main map."""
    path = path or getattr(model, "gradcam_target", None)
    if path:
        return model.get_submodule(path)
    device = next(model.parameters()).device
    with preserved_state(model):
        model.eval()
        convs = feeding_convs(model, torch.rand(1, 3, image_size, image_size, device=device))
    if not convs:
        raise ValueError(f"{type(model).__name__}: no conv layer feeds the main map; pass a target layer path")
    return convs[-1]


def resolve_layer(model: nn.Module, target_layer: nn.Module | str | None) -> nn.Module:
    if isinstance(target_layer, nn.Module):
        return target_layer
    return find_target_layer(model, target_layer)


def gradcam_heatmap(
    model: nn.Module, image_tensor: torch.Tensor, target_layer: nn.Module | str | None = None
) -> np.ndarray:
    """Grad-CAM heatmap (HxW float32 in [0, 1]) of one normalised image (3xHxW or 1x3xHxW)."""
    image = image_tensor if image_tensor.ndim == 4 else image_tensor.unsqueeze(0)
    image = image.to(next(model.parameters()).device)
    layer = resolve_layer(model, target_layer)
    main = MainMap(model)
    with preserved_state(model):
        main.eval()
        with torch.no_grad():
            mask = (main(image)[0, 0] > 0).float()
        if mask.sum() == 0:
            mask = torch.ones_like(mask)
        with GradCAM(model=main, target_layers=[layer]) as cam:
            heatmap = cam(input_tensor=image, targets=[SemanticSegmentationTarget(0, mask.cpu().numpy())])
    return np.clip(heatmap[0], 0.0, 1.0).astype(np.float32)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary HxW mask (the mask minus its 4-neighbour erosion)."""
    inside = np.pad(mask.astype(bool), 1)
    eroded = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return inside[1:-1, 1:-1] & ~eroded


def overlay(image_uint8_hwc: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The heatmap (JET) blended onto the RGB image; ``mask``'s outline, if given, drawn in green."""
    blended = show_cam_on_image(image_uint8_hwc.astype(np.float32) / 255, heatmap, use_rgb=True)
    if mask is not None:
        blended[mask_outline(mask > 0.5)] = (0, 255, 0)
    return blended


def gray(mask: np.ndarray) -> np.ndarray:
    """A [0, 1] HxW mask as a uint8 HxWx3 image."""
    return np.repeat((np.clip(mask, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)


def panel(model: nn.Module, image: np.ndarray, mask: np.ndarray | None, normalize: Normalization,
          target_layer: nn.Module, threshold: float) -> np.ndarray:
    """image | ground truth | prediction | Grad-CAM overlay, side by side (uint8 HxWx3)."""
    backend = TorchBackend(model, normalize, next(model.parameters()).device)
    prob = Predictor(backend, image.shape[0], threshold).predict_resized(image[None])[0]
    prediction = (prob > threshold).astype(np.float32)
    truth = np.zeros_like(prediction) if mask is None else (mask > 0.5).astype(np.float32)
    heat = gradcam_heatmap(model, backend.tensor(image[None]), target_layer)
    return np.concatenate([image, gray(truth), gray(prediction), overlay(image, heat, prediction)], axis=1)


def save_panels(
    model: nn.Module,
    images: Sequence[np.ndarray],
    out_dir: Path | str,
    masks: Sequence[np.ndarray | None] | None = None,
    names: Sequence[str] | None = None,
    normalize: Normalization = "imagenet",
    target_layer: nn.Module | str | None = None,
    threshold: float = 0.5,
) -> list[Path]:
    """Write one PNG panel per uint8 HxWx3 RGB image (sides divisible by 32) atomically; return the paths."""
    layer = resolve_layer(model, target_layer)
    masks = list(masks) if masks is not None else [None] * len(images)
    names = list(names) if names is not None else [f"{i:04d}" for i in range(len(images))]
    paths = []
    with preserved_state(model):
        for image, mask, name in zip(images, masks, names, strict=True):
            path = Path(out_dir) / f"{name}.png"
            write_png(path, panel(model, image, mask, normalize, layer, threshold))
            paths.append(path)
    return paths
