"""IC-PolypSeg, "Integrity Capturing Polyp Segmentation" (METHODS.md section 1).

An EfficientNet encoder (timm ``features_only``, levels F1..F5, F1 dropped) feeds a light decoder made
of three parts the paper introduces:

* **RFE** (receptive field expanding) on F2..F5: a 1x1 branch and three 1x1 -> 1xj -> jx1 branches
  (j = 3, 5, 7), concatenated and projected to ``C`` channels by a 1x1 conv;
* **PFR** (pixel-wise feature redistribution) on the deepest RFE output: a holistic scalar per sample,
  ``H = Q_flat . K_flat``, rescales ``V``;
* **CPFR** (cross-stage PFR) at stages 4, 3, 2, top-down: PFR over the concatenation of the stage's
  RFE output and the 2x upsampled previous decoder output (2C channels), then a 1x1 conv to C;

plus deep supervision (a 1x1-conv prediction P5..P2 from every decoder stage) and **CFC**
(coarse-to-fine calibration), a small encoder-decoder that learns a residual on P2: ``P1 = P2 + P_res``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import Pretrained, create_encoder
from models.registry import register_method

ENCODER_LEVELS = (0, 1, 2, 3, 4)
CFC_WIDTH = 32
CFC_STAGES = 4


class ConvBNReLU(nn.Sequential):
    """Convolution (``kernel`` may be rectangular, 'same' padding) + BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int] = 1) -> None:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ReceptiveFieldExpanding(nn.Module):
    """RFE block of IC-PolypSeg: four parallel branches, concatenated, then a 1x1 conv to ``channels``.

    Branch 1 is a 1x1 conv; branch j (j = 3, 5, 7) is 1x1 -> 1xj -> jx1. Our choices where the paper is
    vague: every branch is ``channels`` wide and every conv is followed by BN + ReLU (PraNet's RFB style).
    The four parallel 1x1 convs (+ BN + ReLU) run as one conv with ``4 * channels`` outputs split in
    four, which is the same computation in fewer graph nodes.
    """

    def __init__(self, in_channels: int, channels: int, kernels: Sequence[int] = (3, 5, 7)) -> None:
        super().__init__()
        self.entry = ConvBNReLU(in_channels, channels * (1 + len(kernels)), 1)
        self.branches = nn.ModuleList(
            nn.Sequential(ConvBNReLU(channels, channels, (1, j)), ConvBNReLU(channels, channels, (j, 1)))
            for j in kernels
        )
        self.fuse = ConvBNReLU(channels * (1 + len(kernels)), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.entry(x).chunk(1 + len(self.branches), dim=1)
        expanded = [branch(r) for branch, r in zip(self.branches, rest, strict=True)]
        return self.fuse(torch.cat([first, *expanded], dim=1))


def holistic_kernel(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``Q_flat (N x 1 x CHW) @ K_flat (N x CHW x 1) / CHW``: one scalar per sample, shape N x 1 x 1.

    Dividing by CHW makes ``H`` the mean of ``Q * K`` over all positions and channels, so it does not grow
    with the resolution. Each factor is scaled by ``CHW ** -0.5`` before the product (same value) so
    that no intermediate sum can overflow, in float16 as well.
    """
    scale = (query.shape[1] * query.shape[2] * query.shape[3]) ** -0.5
    q = (query * scale).flatten(1).unsqueeze(1)
    k = (key * scale).flatten(1).unsqueeze(2)
    return torch.bmm(q, k)


class PixelwiseFeatureRedistribution(nn.Module):
    """PFR block of IC-PolypSeg: ``reshape(H . V_flat)`` with ``H = Q_flat . K_flat / CHW``.

    ``Q``, ``K`` and ``V`` are plain 1x1 convs of the input (no BN, as in the paper); the output keeps the
    input's shape. The normalisation by CHW is our choice (the paper leaves the product unscaled).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # Q, K and V stacked in one 1x1 conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(x).chunk(3, dim=1)
        kernel = holistic_kernel(query, key)
        return (kernel * value.flatten(1).unsqueeze(1)).view_as(value)


class CrossStagePFR(nn.Module):
    """CPFR block of IC-PolypSeg: PFR over ``cat(stage, up2(previous))`` (2C channels), then 1x1 conv to C.

    ``redistribute=False`` is the ablation: the same concat + 1x1 conv fusion without the holistic kernel.
    Our choices: the upsampling is bilinear to the stage's size; the 1x1 conv is followed by BN + ReLU.
    """

    def __init__(self, channels: int, redistribute: bool = True) -> None:
        super().__init__()
        self.redistribute = PixelwiseFeatureRedistribution(2 * channels) if redistribute else nn.Identity()
        self.project = ConvBNReLU(2 * channels, channels, 1)

    def forward(self, stage: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        previous = F.interpolate(previous, size=stage.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(self.redistribute(torch.cat([stage, previous], dim=1)))


class IntegrityDecoder(nn.Module):
    """RFE on every level, PFR on the deepest, CPFR top-down; returns one map per level, shallow first.

    ``pfr=False`` passes the deepest RFE output on unchanged; ``cpfr=False`` fuses each stage by
    concat + 1x1 conv (see :class:`CrossStagePFR`). Both keep the ablated model trainable.
    """

    def __init__(
        self, in_channels: Sequence[int], channels: int, pfr: bool = True, cpfr: bool = True
    ) -> None:
        super().__init__()
        self.rfe = nn.ModuleList(ReceptiveFieldExpanding(c, channels) for c in in_channels)
        self.pfr = PixelwiseFeatureRedistribution(channels) if pfr else nn.Identity()
        self.cpfr = nn.ModuleList(CrossStagePFR(channels, cpfr) for _ in in_channels[:-1])

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        refined = [rfe(feature) for rfe, feature in zip(self.rfe, features, strict=True)]
        decoded = [self.pfr(refined[-1])]
        for stage, cpfr in zip(reversed(refined[:-1]), reversed(self.cpfr), strict=True):
            decoded.append(cpfr(stage, decoded[-1]))
        return decoded[::-1]


class CoarseToFineCalibration(nn.Module):
    """CFC module of IC-PolypSeg: learns a residual on the coarse logits, ``P1 = P2 + P_res``.

    Encoder: ``stages`` levels of 3x3 conv (``width`` filters) + BN + ReLU, a 2x2 max-pool between
    levels; decoder: :class:`IntegrityDecoder` (RFE, PFR, CPFR) at ``width`` channels, then a 1x1 conv to
    the residual. Our choices: the input is the probability ``sigmoid(P2)`` (bounded, whatever the logit
    scale), the residual is added to the logits, and CFC runs at P2's native resolution (stride 4), which
    holds all of P2's information at 1/16 of the full-resolution cost.
    """

    def __init__(
        self, width: int = CFC_WIDTH, stages: int = CFC_STAGES, pfr: bool = True, cpfr: bool = True
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(ConvBNReLU(1 if i == 0 else width, width, 3) for i in range(stages))
        self.decoder = IntegrityDecoder([width] * stages, width, pfr, cpfr)
        self.residual = nn.Conv2d(width, 1, 1)

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        x, features = torch.sigmoid(coarse), []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return coarse + self.residual(self.decoder(features)[0])


class ICPolypSeg(nn.Module):
    """IC-PolypSeg (Integrity Capturing Polyp Segmentation, METHODS.md section 1).

    ``forward`` returns ``(P1, P2, P3, P4, P5)`` logits at the input size (``(P2, .., P5)`` without CFC);
    P1 (CFC-refined) is the main prediction. The switches ``pfr``, ``cpfr``, ``cfc`` drop the paper's
    modules for its ablation and apply to the CFC's decoder too. Choices where the paper is vague are
    documented on each block: PFR normalised by CHW, BN + ReLU after every conv except Q/K/V and the
    prediction heads, CFC on ``sigmoid(P2)`` at stride 4 with 32 filters. The default decoder width
    C = 44 gives 0.677 M decoder parameters (CFC included) with EfficientNet-B0, next to the paper's
    0.67 M. ``pretrained`` defaults to ``"none"`` because only EfficientNet-Lite0..2 weights are offline.
    """

    def __init__(
        self, encoder: str, pretrained: Pretrained, channels: int, pfr: bool, cpfr: bool, cfc: bool
    ) -> None:
        super().__init__()
        self.encoder = create_encoder(encoder, pretrained, out_indices=ENCODER_LEVELS)
        in_channels = self.encoder.feature_info.channels()[1:]
        self.decoder = IntegrityDecoder(in_channels, channels, pfr, cpfr)
        self.heads = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in in_channels)
        self.cfc = CoarseToFineCalibration(pfr=pfr, cpfr=cpfr) if cfc else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(x)[1:]
        logits = [head(f) for head, f in zip(self.heads, self.decoder(features), strict=True)]
        if self.cfc is not None:
            logits.insert(0, self.cfc(logits[0]))
        size = x.shape[-2:]
        return tuple(F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in logits)


@register_method(
    "ic_polypseg",
    paper="Integrity Capturing Polyp Segmentation (IC-PolypSeg), EfficientNet encoder + RFE/PFR/CPFR/CFC",
    test_kwargs={"encoder": "test_efficientnet", "channels": 8},
)
def build_ic_polypseg(
    encoder: str = "efficientnet_b0",
    pretrained: Pretrained = "none",
    channels: int = 44,
    pfr: bool = True,
    cpfr: bool = True,
    cfc: bool = True,
) -> ICPolypSeg:
    return ICPolypSeg(encoder, pretrained, channels, pfr, cpfr, cfc)
