"""PraNet (Fan et al., MICCAI 2020) and PraNet(IF) (METHODS.md section 4).

PraNet: a Res2Net-50 encoder; RFB modules on the last three levels (strides 8, 16, 32); a parallel
partial decoder (PD) that aggregates them into a global map S_g at stride 8; three reverse-attention
(RA) branches, top-down at strides 32, 16, 8, each refining the previous map by a residual learned
from the backbone features weighted by ``1 - sigmoid(previous map)``.

PraNet(IF): the Information-Fusion module replaces the reverse attention: the RFB'd features of the
three levels and the PD map are refined by FRUs, summed and fused by :class:`InformationFusion`, and
a 1x1 convolution predicts the final map from the fused features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import Pretrained, create_encoder
from models.info_fusion import InformationFusion
from models.registry import register_method

LEVELS = (2, 3, 4)  # timm feature indices of strides 8, 16, 32 (PraNet's x2, x3, x4)


def resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``like`` (a no-op when they agree)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ConvBN(nn.Sequential):
    """PraNet's ``BasicConv2d``: conv (no bias) + BN, without an activation."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], dilation: int = 1) -> None:
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (dilation * (k[0] - 1) // 2, dilation * (k[1] - 1) // 2)
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout)
        )


class RFB(nn.Module):
    """PraNet's modified receptive-field block: four branches (1x1; 1xk, kx1, 3x3 dilated k for
    k = 3, 5, 7), concatenated, 3x3 conv, plus a 1x1 shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvBN(cin, cout, 1)])
        for k in (3, 5, 7):
            self.branches.append(
                nn.Sequential(
                    ConvBN(cin, cout, 1),
                    ConvBN(cout, cout, (1, k)),
                    ConvBN(cout, cout, (k, 1)),
                    ConvBN(cout, cout, 3, dilation=k),
                )
            )
        self.cat = ConvBN(4 * cout, cout, 3)
        self.shortcut = ConvBN(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = self.cat(torch.cat([branch(x) for branch in self.branches], dim=1))
        return F.relu(joined + self.shortcut(x))


class PartialDecoder(nn.Module):
    """PraNet's parallel partial decoder (``aggregation``): multiplies and concatenates the three
    RFB'd levels coarse-to-fine and predicts the global map S_g (logits) at the finest (stride 8)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.up1, self.up2, self.up3, self.up4 = (ConvBN(c, c, 3) for _ in range(4))
        self.up5 = ConvBN(2 * c, 2 * c, 3)
        self.concat2 = ConvBN(2 * c, 2 * c, 3)
        self.concat3 = ConvBN(3 * c, 3 * c, 3)
        self.head = nn.Sequential(ConvBN(3 * c, 3 * c, 3), nn.Conv2d(3 * c, 1, 1))

    def forward(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        x3_1 = self.up1(resize(x4, x3)) * x3
        x2_1 = self.up2(resize(x4, x2)) * self.up3(resize(x3, x2)) * x2
        x3_2 = self.concat2(torch.cat([x3_1, self.up4(resize(x4, x3))], dim=1))
        x2_2 = self.concat3(torch.cat([x2_1, self.up5(resize(x3_2, x2))], dim=1))
        return self.head(x2_2)


def reverse_weight(previous: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reverse attention weight ``1 - sigmoid(previous map)``, resized to ``like``."""
    return 1 - torch.sigmoid(resize(previous, like))


class ReverseAttention(nn.Module):
    """One RA branch: weight backbone features by ``1 - sigmoid(prev)``, 1x1 conv to ``width``,
    ``depth`` k x k conv+ReLU layers, an ``out_kernel`` conv to one channel; the result is a
    residual on ``prev``."""

    def __init__(self, cin: int, width: int, kernel: int, depth: int, out_kernel: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBN(cin, width, 1)]
        for _ in range(depth):
            layers += [ConvBN(width, width, kernel), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = ConvBN(width, 1, out_kernel)

    def forward(self, features: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        previous = resize(previous, features)
        return previous + self.out(self.body(reverse_weight(previous, features) * features))


class PraNet(nn.Module):
    """PraNet, D.-P. Fan et al., "PraNet: Parallel Reverse Attention Network for Polyp
    Segmentation", MICCAI 2020; with ``info_fusion`` PraNet(IF) (METHODS.md section 4).

    Outputs (logits at input size): PraNet ``(S_2, S_3, S_4, S_g)`` (main first, each deeply
    supervised); PraNet(IF) ``(fused, S_g)``. Our choices: timm's ``res2net50_26w_4s`` instead of
    the authors' Res2Net-50 v1b (deep stem; timm's ``res2net50d`` is closest); resizes go to the
    target feature's size (not fixed scale factors) so any input divisible by 32 works; RA is
    applied to the raw backbone features as in the authors' code; RA widths per branch are
    ``ra_channels`` (stride 8, 16, 32), (64, 64, 256) as published; all resizes are bilinear with
    ``align_corners=False`` (the authors' PD used ``True``). For IF, the fusion inputs are the three
    RFB'd levels and the PD map (1x1-projected by the IF block), fused at stride 8 with ``channels``
    channels; the prediction is a 1x1 conv of the fused map (no residual on S_g).
    """

    def __init__(
        self,
        encoder: nn.Module,
        channels: int,
        info_fusion: bool,
        ra_channels: Sequence[int],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        widths = encoder.feature_info.channels()
        self.rfbs = nn.ModuleList(RFB(c, channels) for c in widths)
        self.decoder = PartialDecoder(channels)
        self.info_fusion = info_fusion
        if info_fusion:
            self.fusion = InformationFusion([channels, 1, channels, channels], channels)
            self.head = nn.Conv2d(channels, 1, 1)
        else:
            # per level (stride 8, 16, 32): conv kernel, conv count, output kernel as published
            specs = zip(widths, ra_channels, (3, 3, 5), (2, 2, 3), (3, 3, 1), strict=True)
            self.reverse = nn.ModuleList(ReverseAttention(*spec) for spec in specs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(x)
        x2, x3, x4 = (rfb(f) for rfb, f in zip(self.rfbs, features, strict=True))
        global_map = self.decoder(x2, x3, x4)
        if self.info_fusion:
            maps = [self.head(self.fusion([x2, global_map, x3, x4])), global_map]
        else:
            maps = self.refine(features, global_map)
        return tuple(F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False) for m in maps)

    def refine(self, features: list[torch.Tensor], global_map: torch.Tensor) -> list[torch.Tensor]:
        """The RA cascade, coarse to fine; returns ``[S_2, S_3, S_4, S_g]``."""
        maps, previous = [global_map], global_map
        for branch, feature in zip(reversed(self.reverse), reversed(features), strict=True):
            previous = branch(feature, previous)
            maps.insert(0, previous)
        return maps


PAPER = "D.-P. Fan et al., PraNet: Parallel Reverse Attention Network for Polyp Segmentation, MICCAI 2020"
TINY_IF = {"encoder": "test_resnet", "channels": 8}


@register_method("pranet", paper=PAPER, test_kwargs={**TINY_IF, "ra_channels": (8, 8, 8)})
def build_pranet(
    encoder: str = "res2net50_26w_4s",
    pretrained: Pretrained = "none",
    channels: int = 32,
    info_fusion: bool = False,
    ra_channels: Sequence[int] = (64, 64, 256),
) -> PraNet:
    backbone = create_encoder(encoder, pretrained, out_indices=LEVELS)
    return PraNet(backbone, channels, info_fusion, tuple(ra_channels))


@register_method("pranet_if", paper=f"{PAPER}; Information-Fusion variant (METHODS.md 4)", test_kwargs=TINY_IF)
def build_pranet_if(
    encoder: str = "res2net50_26w_4s", pretrained: Pretrained = "none", channels: int = 32
) -> PraNet:
    return build_pranet(encoder, pretrained, channels, info_fusion=True)
