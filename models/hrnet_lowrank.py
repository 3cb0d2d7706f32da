"""HRNet + low-rank module: the EndoCV 2021 polyp segmentation entry (METHODS.md section 3).

HRNetV2 (Wang et al., TPAMI 2020) gives feature maps at strides 4, 8, 16 and 32; they are resized to
the finest, concatenated and mixed by a 1x1 conv + BN + ReLU into ``F_p``. The paper's low-rank module
then rebuilds ``F_p`` from ``D`` learned bases, so that the map the prediction is made from has rank
at most ``D`` (a denoised, global-context version of ``F_p``), and both maps are supervised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import Pretrained, create_encoder
from models.registry import register_method


class LowRankModule(nn.Module):
    """Low-rank reconstruction of a feature map (EndoCV 2021 HRNet entry, METHODS.md section 3).

    With ``X`` = ``F_p`` reshaped to (HW)xC per sample:
    ``F_a = softmax(phi(X))`` in (HW)xD, ``b = (1/N) X^T F_a`` in CxD, ``F_l = F_a b^T`` in (HW)xC.

    Choices where the paper is vague: ``phi`` is a 1x1 conv (affine, with bias); the softmax runs over
    the D bases for every pixel (each pixel is a soft assignment to the bases, as in EM attention, so
    every row of ``F_l`` is a convex combination of the bases); ``N = HW``, so a basis is a pixel average
    of ``F_p`` weighted by its assignments. ``rank(F_l) <= D`` per sample by construction.
    """

    def __init__(self, channels: int, rank: int = 64) -> None:
        super().__init__()
        self.phi = nn.Conv2d(channels, rank, kernel_size=1)

    def attention(self, fp: torch.Tensor) -> torch.Tensor:
        """``F_a``: (batch, HW, D) soft assignments of every pixel to the D bases."""
        return torch.softmax(self.phi(fp).flatten(2).transpose(1, 2), dim=-1)

    def forward(self, fp: torch.Tensor) -> torch.Tensor:
        n, c, h, w = fp.shape
        x = fp.flatten(2).transpose(1, 2)  # (n, HW, C)
        fa = self.attention(fp)  # (n, HW, D)
        bases = torch.bmm(x.transpose(1, 2), fa) / (h * w)  # (n, C, D)
        fl = torch.bmm(fa, bases.transpose(1, 2))  # (n, HW, C)
        return fl.transpose(1, 2).reshape(n, c, h, w)


class HRNetLowRank(nn.Module):
    """HRNetV2 segmenter with the EndoCV 2021 low-rank module (METHODS.md section 3).

    Returns ``(logits from F_l, logits from F_p)`` with ``lowrank`` on and ``(logits from F_p,)`` off
    (the plain HRNet baseline); the logits are bilinearly upsampled to the input size.

    Choices where the paper is vague: for HRNet encoders the raw branch outputs are used (timm
    ``feature_location=""``, HRNetV2's 18/36/72/144 channels for W18), not the classification
    "incre" features; ``C`` defaults to the sum of the branch channels (HRNetV2's head); each head is a
    1x1 conv to one logit (the two-class softmax of the paper becomes one sigmoid logit), and the F_l
    head starts with a BatchNorm: at initialisation F_l is ~1/D of F_p's scale and nearly uniform over
    space (soft assignments near 1/D), which without it leaves the F_l head barely trainable.
    """

    def __init__(self, encoder: nn.Module, channels: int | None, rank: int, lowrank: bool) -> None:
        super().__init__()
        self.encoder = encoder
        in_channels = sum(encoder.feature_info.channels())
        channels = channels or in_channels
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.lowrank = LowRankModule(channels, rank) if lowrank else None
        self.head_l = nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, 1, 1)) if lowrank else None
        self.head_p = nn.Conv2d(channels, 1, kernel_size=1)
        # the layer Grad-CAM explains by default (polypflow.evaluate.gradcam): the map the main head reads
        self.gradcam_target = "lowrank" if lowrank else "fuse"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``F_p``: the multi-resolution features at the finest resolution, concatenated and mixed."""
        feats = self.encoder(x)
        size = feats[0].shape[-2:]
        resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return self.fuse(torch.cat([feats[0], *resized], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fp = self.features(x)
        maps = [self.head_p(fp)]
        if self.lowrank is not None and self.head_l is not None:
            maps.insert(0, self.head_l(self.lowrank(fp)))
        return tuple(F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False) for m in maps)


def hrnet_encoder(name: str, pretrained: Pretrained) -> nn.Module:
    """A timm multi-resolution encoder: HRNet's four branch outputs, or stages 1..4 of another model."""
    extra = {"feature_location": ""} if name.startswith("hrnet") else {}
    return create_encoder(name, pretrained, out_indices=(1, 2, 3, 4), **extra)


@register_method(
    "hrnet_lowrank",
    paper="EndoCV 2021: HRNet + low-rank module for polyp segmentation (METHODS.md section 3)",
    test_kwargs={"encoder": "hrnet_w18_small", "channels": 16, "rank": 4},
)
def build_hrnet_lowrank(
    encoder: str = "hrnet_w18",
    pretrained: Pretrained = "none",
    channels: int | None = None,
    rank: int = 64,
    lowrank: bool = True,
) -> HRNetLowRank:
    """``pretrained="hub"`` loads timm's ImageNet HRNet (online); no offline HRNet weights exist here."""
    return HRNetLowRank(hrnet_encoder(encoder, pretrained), channels, rank, lowrank)
