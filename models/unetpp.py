"""UNet++ baseline (Zhou et al., DLMIA 2018) from segmentation-models-pytorch on a timm encoder.

Nested, densely connected skip pathways between a timm encoder and smp's ``UnetPlusPlus`` decoder;
the encoder's ImageNet weights load offline through :mod:`models.encoders` (see :mod:`models.unet`).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp

from models.encoders import Pretrained
from models.registry import register_method
from models.unet import SmpSegmenter, smp_model


@register_method(
    "unetpp",
    paper="Z. Zhou et al., UNet++: A Nested U-Net Architecture for Medical Image Segmentation, DLMIA 2018",
    test_kwargs={"encoder": "test_efficientnet", "decoder_channels": (16, 8, 8, 8, 8)},
)
def build_unetpp(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> SmpSegmenter:
    return smp_model(smp.UnetPlusPlus, encoder, pretrained, decoder_channels=tuple(decoder_channels))
