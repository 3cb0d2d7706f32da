"""UNet baseline (Ronneberger et al., MICCAI 2015) from segmentation-models-pytorch on a timm encoder.

The encoder is any timm model (``tu-<name>`` in smp); ImageNet weights are loaded through
:mod:`models.encoders` so that the offline EfficientNet-Lite weights work without internet.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from models.encoders import Pretrained, load_pretrained
from models.registry import register_method


class SmpSegmenter(nn.Module):
    """Wraps an smp model so that it follows the registry's output contract (a tuple of logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.net(x),)


def smp_model(arch: type[nn.Module], encoder: str, pretrained: Pretrained, **kwargs) -> SmpSegmenter:
    """Build smp architecture ``arch`` on timm encoder ``encoder`` with one output class."""
    net = arch(encoder_name=f"tu-{encoder}", encoder_weights=None, classes=1, **kwargs)
    load_pretrained(net.encoder.model, encoder, pretrained)
    return SmpSegmenter(net)


@register_method(
    "unet",
    paper="O. Ronneberger et al., U-Net, MICCAI 2015",
    test_kwargs={"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
)
def build_unet(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> SmpSegmenter:
    return smp_model(smp.Unet, encoder, pretrained, decoder_channels=tuple(decoder_channels))
