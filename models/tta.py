"""Flip test-time augmentation as part of the network, so that the figure a user gets is the figure reported.

``tta`` is a builder argument of every segmentation method (``methods.<name>.model.tta``, see
:func:`models.registry.build_model`): the built network is wrapped in :class:`FlipTTA`, which is what is saved
(its weights under ``net.``), rebuilt by ``load_trained``, validated during training, evaluated, exported to ONNX
(the flips are in the graph) and served. In training mode it is the plain network; in eval mode each output map
is the mean of the network's logits over the identity and the flips, each flipped back.

The model also carries the **temperature** its main map ships with (:func:`temperature`): the map is
``sigmoid(T * logit)``, ``T`` chosen by train@ on validation (``train.temperatures``) and kept in the trained
model's metadata, set on the module by ``load_trained``; the predictor and the exported graph apply it, so the
served, exported and evaluated maps are the same. It is a plain attribute, not a weight: a checkpoint's
``state_dict`` is the same whatever it is.

Written by hand rather than with ``ttach``: that package (last release 2020) wraps networks returning one tensor,
and every segmenter of the registry returns a tuple of maps (``models.registry``'s contract).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Tta = Literal["none", "hflip", "hvflip"]
# the spatial dims each view flips (N×C×H×W): the identity first
VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "hflip": ((), (3,)),
    "hvflip": ((), (3,), (2,)),
}


class FlipTTA(nn.Module):
    """``net`` averaged over flipped views of its input in eval mode (logits, per output map); itself in training."""

    def __init__(self, net: nn.Module, tta: Tta) -> None:
        super().__init__()
        if tta not in VIEWS:
            raise ValueError(f"tta must be one of {['none', *VIEWS]}, got {tta!r}")
        self.net, self.tta = net, tta
        target = getattr(net, "gradcam_target", None)
        if target:
            self.gradcam_target = f"net.{target}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.training:
            return self.net(x)
        views = VIEWS[self.tta]
        total = None
        for dims in views:
            outputs = in_view(self.net, x, dims)
            total = outputs if total is None else tuple(t + o for t, o in zip(total, outputs, strict=True))
        return tuple(t / len(views) for t in total)


def in_view(net: nn.Module, x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """``net``'s output maps on one view of ``x``: the input flipped along ``dims``, each map flipped back (``()``:
    the identity)."""
    if not dims:
        return net(x)
    return tuple(o.flip(dims) for o in net(x.flip(dims)))


def with_tta(net: nn.Module, tta: Tta) -> nn.Module:
    """``net`` itself for ``"none"``, else wrapped in :class:`FlipTTA`."""
    return net if tta == "none" else FlipTTA(net, tta)


def plain(model: nn.Module) -> nn.Module:
    """The network inside a :class:`FlipTTA` (what Grad-CAM explains: one view, one pass), with the model's
    temperature, else ``model``."""
    return with_temperature(model.net, temperature(model)) if isinstance(model, FlipTTA) else model


def temperature(model: nn.Module) -> float:
    """The scale ``T`` on the main map's logits the model ships with (1: the network's own map)."""
    return float(getattr(model, "temperature", 1.0))


def with_temperature(model: nn.Module, value: float) -> nn.Module:
    """``model`` shipping its main map as ``sigmoid(value * logit)``."""
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")
    model.temperature = float(value)
    return model


def scaled(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` scaled by the model's temperature (untouched at 1: the graph is the network's own)."""
    t = temperature(model)
    return logits if t == 1 else logits * t
