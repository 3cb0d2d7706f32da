"""SegNet baseline (Badrinarayanan, Kendall & Cipolla, TPAMI 2017), trained from scratch as in CRIS.

No library ships SegNet (smp has no max-unpooling decoder), so the network is written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import Pretrained
from models.registry import register_method

VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)  # convolutions per VGG-16 stage (13 in the encoder)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv_stack(channels: list[int]) -> nn.Sequential:
    """Conv-BN-ReLU layers through ``channels[0] -> channels[1] -> ...``."""
    return nn.Sequential(*(conv_bn_relu(a, b) for a, b in zip(channels, channels[1:], strict=False)))


class SegNet(nn.Module):
    """SegNet: a VGG-16-style encoder whose max-pooling indices drive a mirrored decoder's unpooling.

    Paper: V. Badrinarayanan et al., "SegNet: A Deep Convolutional Encoder-Decoder Architecture for
    Image Segmentation", TPAMI 2017. Encoder stage ``i`` has ``VGG16_STAGE_CONVS[i]`` 3x3
    conv-BN-ReLU layers of width ``base_channels * 2**min(i, 3)`` (64, 128, 256, 512, 512 at full
    size) and a 2x2 max-pool that keeps its argmax indices. Decoder stage ``i`` max-unpools with
    those indices (sparse upsampling, no learned upsampling and no skip features), then mirrors the
    encoder's convolutions, its last one narrowing to the next stage's width. Choices of ours: the
    final classifier is a plain 3x3 conv to one logit map (the paper's multi-class softmax becomes
    a sigmoid in the loss); ``depth`` < 5 drops the deepest stages for tiny test variants.

    ONNX: ``F.max_unpool2d`` exports with the dynamo exporter (opset 18); torchlib lowers it to a
    ``ScatterND`` into a zero tensor and converts ONNX ``MaxPool``'s N·C·H·W-flattened indices to
    PyTorch's per-plane ones, so no hand-written scatter is needed (tests check the parity).
    """

    def __init__(self, base_channels: int = 64, depth: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        if not 1 <= depth <= len(VGG16_STAGE_CONVS):
            raise ValueError(f"depth must be in 1..{len(VGG16_STAGE_CONVS)}, got {depth}")
        widths = [base_channels * 2 ** min(i, 3) for i in range(depth)]
        convs = VGG16_STAGE_CONVS[:depth]
        inputs = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(
            conv_stack([cin] + [w] * n) for cin, w, n in zip(inputs, widths, convs, strict=True)
        )
        outputs = [widths[0], *widths[:-1]]  # decoder stage i narrows to stage i-1's width
        self.decoder = nn.ModuleList(
            conv_stack([w] * n + [out]) if i > 0 else conv_stack([w] * n)
            for i, (w, out, n) in enumerate(zip(widths, outputs, convs, strict=True))
        )
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        indices = []
        for stage in self.encoder:
            x, idx = F.max_pool2d(stage(x), 2, 2, return_indices=True)
            indices.append(idx)
        for stage, idx in zip(reversed(self.decoder), reversed(indices), strict=True):
            x = stage(F.max_unpool2d(x, idx, 2, 2))
        return (self.head(x),)


@register_method(
    "segnet",
    paper="V. Badrinarayanan et al., SegNet, TPAMI 2017",
    test_kwargs={"base_channels": 4, "depth": 3},
)
def build_segnet(base_channels: int = 64, depth: int = 5, pretrained: Pretrained = "none") -> SegNet:
    if pretrained != "none":
        raise ValueError(
            f"segnet supports only pretrained='none' (trained from scratch as in CRIS; no offline "
            f"VGG-16 weights), got {pretrained!r}"
        )
    return SegNet(base_channels=base_channels, depth=depth)
