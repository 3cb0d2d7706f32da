"""FCN-8s baseline (Long et al., CVPR 2015) on a timm encoder, optionally with the Information-Fusion head.

FCN-8s: a 1x1 "score" convolution on the stride-32, -16 and -8 features; the coarsest score map is
upsampled and added to the next finer one (twice), and the stride-8 sum is upsampled to the input.
With ``info_fusion=True`` (METHODS.md section 4, "FCN(IF)") the score/skip path is replaced by the
IF block over the FCN-32s/16s/8s/4s levels (encoder strides 32, 16, 8, 4); see :class:`FusionHead`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import Pretrained, create_encoder
from models.info_fusion import InformationFusion
from models.registry import register_method

# encoder levels used: strides 4 (FCN-4s, IF only), 8, 16, 32 (timm feature indices 1..4)
FCN_OUT_INDICES = (1, 2, 3, 4)
FCN_REDUCTIONS = [4, 8, 16, 32]


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FCN8sHead(nn.Module):
    """FCN-8s score layers and upsample-and-add skip fusion over ``features`` (fine to coarse).

    Choices where the paper differs: bilinear upsampling instead of learned deconvolutions (FCN
    initialises them bilinear; with one class the learned version adds little) and one-shot training
    without the paper's FCN-32s -> 16s -> 8s staging or its fixed skip scaling.
    """

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        self.score = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = self.score[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            logits = upsample(logits, features[i].shape[-2:]) + self.score[i](features[i])
        return logits


class FusionHead(nn.Module):
    """IF head: FRUs on every level, fused by :class:`InformationFusion` at the finest level's
    resolution (stride 4 for FCN), then a 1x1 classifier on the fused map gives the logits."""

    def __init__(self, in_channels: Sequence[int], fuse_channels: int) -> None:
        super().__init__()
        self.fusion = InformationFusion(in_channels, fuse_channels)
        self.classifier = nn.Conv2d(fuse_channels, 1, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.fusion(features))


class FCN(nn.Module):
    """FCN-8s (J. Long, E. Shelhamer, T. Darrell, "Fully Convolutional Networks for Semantic
    Segmentation", CVPR 2015) on a timm ``features_only`` encoder, one logit channel.

    ``info_fusion=False``: :class:`FCN8sHead` on the stride-8/16/32 features (the stride-4 feature is
    computed by the encoder anyway but unused). ``info_fusion=True``: :class:`FusionHead` on the
    stride-4/8/16/32 features; the prediction is the 1x1 classifier applied to the fused stride-4
    map, bilinearly upsampled to the input. The encoder is identical in both modes.
    """

    def __init__(self, encoder: nn.Module, info_fusion: bool, fuse_channels: int) -> None:
        super().__init__()
        reductions = encoder.feature_info.reduction()
        if list(reductions) != FCN_REDUCTIONS:
            raise ValueError(f"FCN needs encoder features at strides {FCN_REDUCTIONS}, got {reductions}")
        channels = encoder.feature_info.channels()
        self.encoder = encoder
        self.info_fusion = info_fusion
        self.head = FusionHead(channels, fuse_channels) if info_fusion else FCN8sHead(channels[1:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(x)
        logits = self.head(features if self.info_fusion else features[1:])
        return (upsample(logits, x.shape[-2:]),)


@register_method(
    "fcn",
    paper="J. Long et al., Fully Convolutional Networks for Semantic Segmentation, CVPR 2015",
    test_kwargs={"encoder": "test_efficientnet", "fuse_channels": 8},
)
def build_fcn(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    info_fusion: bool = False,
    fuse_channels: int = 64,
) -> FCN:
    """FCN-8s; ``info_fusion=True`` swaps the skip fusion for the IF head (``fuse_channels`` wide)."""
    net = create_encoder(encoder, pretrained, out_indices=FCN_OUT_INDICES)
    return FCN(net, info_fusion=info_fusion, fuse_channels=fuse_channels)
