"""Information-Fusion (IF) variants of UNet and UNet++ (METHODS.md section 4), plus registry aliases
``fcn_if`` and ``resunetpp_if`` for the FCN and ResUNet++ builders with ``info_fusion=True``.

UNet(IF) and UNet++(IF) keep smp's decoders unchanged. Forward hooks on the decoder blocks that
follow each skip connection collect their outputs; :class:`InformationFusion` fuses them at the
finest (input) resolution, and smp's own segmentation head reads the fused map instead of the last
block's output. The hooks are plain Python during tracing, so the dynamo ONNX export sees an
ordinary graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import segmentation_models_pytorch as smp
import torch
from torch import nn

from models.encoders import Pretrained
from models.fcn import FCN, build_fcn
from models.info_fusion import InformationFusion
from models.registry import register_method
from models.resunetpp import ResUNetPlusPlus, build_resunetpp
from models.unet import smp_model

SMP_TEST_KWARGS = {"encoder": "test_efficientnet", "decoder_channels": (32, 16, 16, 8, 8)}
IF_PAPER = "Information fusion (IF) module for polyp segmentation, METHODS.md section 4"


class DecoderTap:
    """Forward hooks that keep the latest output of each module in ``modules``, by position.

    Not safe for concurrent forwards of one model instance (e.g. ``nn.DataParallel`` replicas).
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self.size = len(modules)
        self.handles = [m.register_forward_hook(partial(self._keep, i)) for i, m in enumerate(modules)]

    def _keep(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.outputs[index] = output

    def pop(self) -> list[torch.Tensor]:
        """The captured outputs in module order; raises if a module did not run since the last pop."""
        missing = [i for i in range(self.size) if i not in self.outputs]
        if missing:
            raise RuntimeError(f"decoder levels {missing} produced no output")
        outputs, self.outputs = self.outputs, {}
        return [outputs[i] for i in range(self.size)]


class FusedSmpSegmenter(nn.Module):
    """An smp encoder-decoder whose decoder levels ``levels`` (coarse to fine, the last at the input's
    resolution) are fused by Information Fusion before smp's segmentation head.

    Our reading of "IF after each UNet skip" (the paper is vague): one FRU per decoder block output,
    i.e. after every skip concatenation (strides 16, 8, 4, 2) plus the final full-resolution block;
    the fused map has the last block's channel count, so smp's head is reused unchanged and the IF
    block is the only added module.
    """

    def __init__(self, net: nn.Module, levels: Sequence[nn.Module], channels: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.fusion = InformationFusion(list(channels)[::-1], channels[-1])
        self.tap = DecoderTap(levels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.net.decoder(self.net.encoder(x))
        fused = self.fusion(self.tap.pop()[::-1])
        return (self.net.segmentation_head(fused),)


def unet_levels(net: smp.Unet) -> list[nn.Module]:
    return list(net.decoder.blocks)


def unetpp_levels(net: smp.UnetPlusPlus) -> list[nn.Module]:
    """The top row of the nested decoder, X^{0,j}: one block per resolution, ending at full size."""
    return [net.decoder.blocks[f"x_0_{j}"] for j in range(net.decoder.depth + 1)]


@register_method("unet_if", paper=f"U-Net with IF; {IF_PAPER}", test_kwargs=SMP_TEST_KWARGS)
def build_unet_if(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> FusedSmpSegmenter:
    net = smp_model(smp.Unet, encoder, pretrained, decoder_channels=tuple(decoder_channels)).net
    return FusedSmpSegmenter(net, unet_levels(net), decoder_channels)


@register_method("unetpp_if", paper=f"UNet++ with IF; {IF_PAPER}", test_kwargs=SMP_TEST_KWARGS)
def build_unetpp_if(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
) -> FusedSmpSegmenter:
    net = smp_model(smp.UnetPlusPlus, encoder, pretrained, decoder_channels=tuple(decoder_channels)).net
    return FusedSmpSegmenter(net, unetpp_levels(net), decoder_channels)


@register_method(
    "fcn_if", paper=f"FCN-8s with IF; {IF_PAPER}", test_kwargs={"encoder": "test_efficientnet", "fuse_channels": 8}
)
def build_fcn_if(
    encoder: str = "tf_efficientnet_lite0", pretrained: Pretrained = "offline", fuse_channels: int = 64
) -> FCN:
    return build_fcn(encoder=encoder, pretrained=pretrained, info_fusion=True, fuse_channels=fuse_channels)


@register_method("resunetpp_if", paper=f"ResUNet++ with IF; {IF_PAPER}", test_kwargs={"base_channels": 4})
def build_resunetpp_if(pretrained: Pretrained = "none", base_channels: int = 16) -> ResUNetPlusPlus:
    return build_resunetpp(pretrained=pretrained, base_channels=base_channels, info_fusion=True)
