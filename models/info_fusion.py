"""Information-Fusion (IF) module: feature refinement units (FRU) + a learned fusion of all levels.

Paper: "Information fusion" for polyp segmentation (METHODS.md section 4). At every encoder/decoder
level a RefineNet-style FRU (two conv+ReLU layers with a residual connection) refines the features;
the FRU outputs are projected to one channel count, resized to the finest level, summed, and a 1x1
convolution learns the fusion weights. Our choice where the paper is vague: the projection is a 1x1
conv per level, applied before the sum, and the sum is followed by BN + ReLU before the 1x1 fusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FeatureRefinementUnit(nn.Module):
    """RefineNet residual conv unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class InformationFusion(nn.Module):
    """Fuse feature maps of several resolutions into one map at the finest (first) resolution.

    ``in_channels[i]`` is the channel count of ``features[i]``; the output has ``out_channels``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.refine = nn.ModuleList(FeatureRefinementUnit(out_channels) for _ in in_channels)
        self.fuse = nn.Sequential(
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Conv2d(out_channels, out_channels, 1)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        total = None
        for feature, project, refine in zip(features, self.project, self.refine, strict=True):
            level = refine(project(feature))
            if level.shape[-2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            total = level if total is None else total + level
        return self.fuse(total)
