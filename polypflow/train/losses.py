"""One loss module for every method: a per-map criterion applied to each output map (deep supervision).

``build_loss(recipe.loss, recipe.deep_supervision_weights)`` returns a callable
``loss(outputs, mask, epoch)``; ``epoch`` (0-based) matters only for CRIS's interleaved schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

MapLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_dice = DiceLoss(mode="binary", from_logits=True)


def bce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, mask)


def dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _dice(logits, mask)


def bce_dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + Dice (the two-class "CE + Dice" of the HRNet paper, for one class)."""
    return bce(logits, mask) + dice(logits, mask)


def boundary_weight(mask: torch.Tensor) -> torch.Tensor:
    """``1 + 5 |avgpool_k(mask) - mask|``, the structure loss's pixel weights (k = 31 px at 352 px, scaled).

    The k x k mean (zero padding counted, as ``avg_pool2d`` does) is computed as a k x 1 then a 1 x k mean:
    the same box filter at 2k instead of k^2 operations per pixel."""
    kernel = max(3, (min(mask.shape[-2:]) * 31 // 352) | 1)  # 31 px at 352 px, scaled with the image
    pad = kernel // 2
    box = F.avg_pool2d(F.avg_pool2d(mask, (kernel, 1), stride=1, padding=(pad, 0)), (1, kernel), stride=1, padding=(0, pad))
    return 1 + 5 * torch.abs(box - mask)


def structure(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE + weighted IoU, boundary pixels up-weighted (F3Net/PraNet "structure loss").

    ``weight`` (:func:`boundary_weight` of ``mask``) may be passed in when several maps share one mask."""
    weight = boundary_weight(mask) if weight is None else weight
    wbce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weight * wbce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def mse_prob(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(logits), mask)


MAP_LOSSES: dict[str, MapLoss] = {
    "bce": bce,
    "dice": dice,
    "bce_dice": bce_dice,
    "structure": structure,
    "mse": mse_prob,
}


def cris_active_loss(epoch: int) -> str:
    """CRIS interleaving: even epochs back-propagate L1 (backbone MSE), odd epochs L2 (refined BCE)."""
    return "L1" if epoch % 2 == 0 else "L2"


class SegLoss:
    """Sum of ``weights[i] * criterion(outputs[i], mask)`` over the output maps."""

    def __init__(self, name: str, weights: Sequence[float] = ()) -> None:
        if name != "cris_interleaved" and name not in MAP_LOSSES:
            raise ValueError(f"unknown loss {name!r}; known: {sorted([*MAP_LOSSES, 'cris_interleaved'])}")
        self.name = name
        self.weights = list(weights)

    def __call__(self, outputs: Sequence[torch.Tensor], mask: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        if self.name == "cris_interleaved":
            refined, backbone = outputs[0], outputs[1]
            return mse_prob(backbone, mask) if cris_active_loss(epoch) == "L1" else bce(refined, mask)
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} output maps")
        criterion = MAP_LOSSES[self.name]
        if criterion is structure:  # every map shares the mask: its boundary weights are computed once
            pixel_weight = boundary_weight(mask)
            criterion = lambda out, m: structure(out, m, pixel_weight)  # noqa: E731
        return sum(w * criterion(out, mask) for w, out in zip(weights, outputs, strict=True))


def build_loss(name: str, weights: Sequence[float] = ()) -> SegLoss:
    return SegLoss(name, weights)
