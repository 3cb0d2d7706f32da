"""PolypSeg-GradCAM's segmenter: a UNet on a ResNet-34 encoder (METHODS.md section 5).

The explainability half of the paper (Grad-CAM on the last decoder features) lives in
:mod:`polypflow.evaluate.gradcam` and works for every registered method.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp

from models.encoders import Pretrained
from models.registry import register_method
from models.unet import SmpSegmenter, smp_model


@register_method(
    "unet_r34_gradcam",
    paper="PolypSeg-GradCAM: UNet + ResNet-34 with Grad-CAM explanations (METHODS.md section 5)",
    test_kwargs={"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
)
def build_unet_r34_gradcam(
    encoder: str = "resnet34",
    pretrained: Pretrained = "none",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> SmpSegmenter:
    """UNet of PolypSeg-GradCAM (METHODS.md section 5): timm ResNet-34 + smp's UNet decoder.

    smp's decoder is the paper's: nearest-neighbour x2 upsampling, concatenated skip connection, two
    Conv-BN-ReLU per block, a 1x1 conv to one logit (24.4 M parameters with ResNet-34). The paper's
    encoder is ImageNet-pretrained; those weights exist here only through ``pretrained="hub"`` (online),
    hence the default ``"none"``.
    """
    return smp_model(
        smp.Unet, encoder, pretrained, decoder_channels=tuple(decoder_channels), decoder_interpolation="nearest"
    )
