"""ResUNet++ baseline (Jha et al., ISM 2019), trained from scratch, optionally with Information Fusion.

Residual units with squeeze-and-excitation in the encoder, an ASPP bridge, attention gates before each
decoder upsampling, and an ASPP + 1x1 convolution output, following the authors' reference code
(``m_resunet.py``): widths ``base * (1, 2, 4, 8, 16)`` (16 in the paper), SE ratio 8, ASPP rates 6/12/18.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import SEModule
from torch import nn

from models.encoders import Pretrained
from models.info_fusion import InformationFusion
from models.registry import register_method


def bn_relu_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, stride, 1)
    )


class ResidualUnit(nn.Module):
    """Pre-activation residual unit (BN-ReLU-conv twice, 1x1 conv+BN shortcut) followed by SE.

    ``stem=True`` gives the first unit, whose first convolution sees the raw image (no BN-ReLU before).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, stem: bool = False) -> None:
        super().__init__()
        first = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1))
            if stem
            else bn_relu_conv(in_channels, out_channels, stride)
        )
        self.body = nn.Sequential(first, bn_relu_conv(out_channels, out_channels))
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride), nn.BatchNorm2d(out_channels)
        )
        self.se = SEModule(out_channels, rd_ratio=1 / 8, rd_divisor=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.body(x) + self.shortcut(x))


class ASPP(nn.Module):
    """ResUNet++'s ASPP: 3x3 convs at dilations (1, 6, 12, 18), each + BN, summed, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r), nn.BatchNorm2d(out_channels)
            )
            for r in rates
        )
        self.project = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(sum(branch(x) for branch in self.branches))


class AttentionGate(nn.Module):
    """ResUNet++ attention: the encoder skip (2x finer), convolved and max-pooled, plus the convolved
    decoder feature, gives a gate map that multiplies the decoder feature."""

    def __init__(self, skip_channels: int, channels: int) -> None:
        super().__init__()
        self.skip = nn.Sequential(bn_relu_conv(skip_channels, channels), nn.MaxPool2d(2))
        self.decoder = bn_relu_conv(channels, channels)
        self.gate = bn_relu_conv(channels, channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.skip(skip) + self.decoder(x)) * x


class DecoderStage(nn.Module):
    """Attention gate, 2x nearest upsampling, concatenation with the skip, residual unit."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.attention = AttentionGate(skip_channels, in_channels)
        self.unit = ResidualUnit(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.attention(skip, x), scale_factor=2.0, mode="nearest")
        return self.unit(torch.cat([x, skip], dim=1))


class ResUNetPlusPlus(nn.Module):
    """ResUNet++ (D. Jha et al., "ResUNet++: An Advanced Architecture for Medical Image
    Segmentation", IEEE ISM 2019), one logit channel, output stride 1 (three 2x downsamplings).

    ``info_fusion=True`` (METHODS.md section 4, "ResUNet++(IF)"): the outputs of the three decoder
    stages (strides 4, 2, 1; one per skip connection) are fused by :class:`InformationFusion` into a
    map with the last stage's channel count at full resolution, and the output ASPP + 1x1 conv read
    that fused map instead of the last stage alone; the IF block is the only added module.
    """

    def __init__(self, base_channels: int = 16, info_fusion: bool = False) -> None:
        super().__init__()
        c = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList(
            [ResidualUnit(3, c[0], stem=True)] + [ResidualUnit(c[i - 1], c[i], stride=2) for i in (1, 2, 3)]
        )
        self.bridge = ASPP(c[3], c[4])
        self.decoder = nn.ModuleList(DecoderStage(c[i + 1], c[i - 1], c[i]) for i in (3, 2, 1))
        self.fusion = InformationFusion([c[1], c[2], c[3]], c[1]) if info_fusion else None
        self.output = nn.Sequential(ASPP(c[1], c[0]), nn.Conv2d(c[0], 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skips = []
        for unit in self.encoder:
            x = unit(x)
            skips.append(x)
        x = self.bridge(skips.pop())
        levels = []
        for stage in self.decoder:
            x = stage(x, skips.pop())
            levels.append(x)
        if self.fusion is not None:
            x = self.fusion(levels[::-1])
        return (self.output(x),)


@register_method(
    "resunetpp",
    paper="D. Jha et al., ResUNet++: An Advanced Architecture for Medical Image Segmentation, ISM 2019",
    test_kwargs={"base_channels": 4},
)
def build_resunetpp(
    pretrained: Pretrained = "none", base_channels: int = 16, info_fusion: bool = False
) -> ResUNetPlusPlus:
    """ResUNet++ from scratch; ``pretrained`` must be "none" (the paper uses no pretrained weights)."""
    if pretrained != "none":
        raise ValueError(f"resunetpp is trained from scratch: pretrained must be 'none', got {pretrained!r}")
    return ResUNetPlusPlus(base_channels=base_channels, info_fusion=info_fusion)
