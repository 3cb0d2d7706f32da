"""One-stage polyp detector: ATSS sample selection + Generalized Focal Loss v2 on an FPN over a timm encoder.

The detection system of the EndoCV 2021 entry (METHODS.md section 3): ATSS (S. Zhang et al., CVPR 2020)
chooses the training anchors (:mod:`polypflow.train.gfl.atss`), GFLv2 (X. Li et al., "Generalized Focal
Loss V2: Learning Reliable Localization Quality Estimation for Dense Object Detection", CVPR 2021) is the
head and its loss (:mod:`polypflow.train.gfl.losses`).

* **Encoder**: a timm ``features_only`` model (EfficientNet-Lite0 with offline ImageNet weights by
  default), its stride 8, 16 and 32 maps.
* **Neck**: torchvision's ``FeaturePyramidNetwork``: P3-P5 (``levels=3``, the default) or P3-P7
  (``levels=5``, torchvision's ``LastLevelP6P7`` on P5, as ATSS/GFL on COCO). At this project's 256-352
  px inputs P6/P7 would be 6x6/3x3 (at 352) maps whose anchors (8 x stride: 512 and 1024 px) are larger
  than the image, while P5's distribution range (reg_max x stride = 512 px per edge) already spans
  the image: P3-P5 is enough; ``levels=5`` is there for the paper's 512+ px inputs.
* **Head** (shared over levels): ``head_convs`` 3x3 conv + GroupNorm + ReLU towers for classification
  and for the box; the box conv predicts, per edge, logits over ``reg_max + 1`` distance bins (scaled
  per level by a learned scalar, as GFL does); the classification conv one logit (class "polyp").
* **DGQP** (GFLv2): the top-``reg_topk`` probabilities of each edge's distribution and their mean
  (4 x (reg_topk + 1) statistics) go through a 1x1-conv MLP to a sigmoid that multiplies the class
  probability: the output score is the joint class-and-quality score, a probability.

Output contract (differs from the segmenters'): ``forward(x)`` returns :class:`DetectorOutputs`, a
named tuple ``(scores, box_logits)`` of per-level tuples, P3 first: ``scores[l]`` N x 1 x H_l x W_l joint
scores in [0, 1] and ``box_logits[l]`` N x 4(reg_max+1) x H_l x W_l (left, top, right, bottom, bins
contiguous), the same in train and eval mode. :meth:`GFLDetector.flatten` lays them out per anchor and
:meth:`GFLDetector.decode` turns them into boxes after NMS.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, clip_boxes_to_image, nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from models.encoders import Pretrained, create_encoder
from models.registry import register_method
from models.anchors import AnchorGrid, anchor_grid, distances_to_boxes, expected_distances

PAPER = ("GFLv2: X. Li et al., Generalized Focal Loss V2, CVPR 2021; ATSS: S. Zhang et al., CVPR 2020; "
         "EndoCV 2021 detection entry (METHODS.md section 3)")


class DetectorOutputs(NamedTuple):
    scores: tuple[torch.Tensor, ...]
    box_logits: tuple[torch.Tensor, ...]


class Detections(NamedTuple):
    """One image's detections: ``boxes`` K x 4 (x1, y1, x2, y2, pixels) and ``scores`` K, best first."""

    boxes: torch.Tensor
    scores: torch.Tensor


class Scale(nn.Module):
    """A learned scalar multiplier (one per pyramid level on the shared box branch, as in FCOS/GFL)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def conv_tower(channels: int, depth: int) -> nn.Sequential:
    groups = math.gcd(32, channels)
    layers = [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                            nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)) for _ in range(depth)]
    return nn.Sequential(*layers)


class DGQP(nn.Module):
    """GFLv2's Distribution-Guided Quality Predictor: edge-distribution statistics -> quality in (0, 1)."""

    def __init__(self, reg_max: int, topk: int = 4, channels: int = 64) -> None:
        super().__init__()
        self.reg_max, self.topk = reg_max, topk
        self.mlp = nn.Sequential(nn.Conv2d(4 * (topk + 1), channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, box_logits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = box_logits.shape
        prob = box_logits.reshape(n, 4, self.reg_max + 1, h, w).softmax(dim=2)
        top = prob.topk(self.topk, dim=2).values
        stats = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2)
        return self.mlp(stats.reshape(n, 4 * (self.topk + 1), h, w))


class GFLHead(nn.Module):
    """GFLv2 head shared over pyramid levels: joint scores and box-edge distribution logits."""

    def __init__(self, channels: int, levels: int, convs: int, reg_max: int, reg_topk: int, dgqp_channels: int) -> None:
        super().__init__()
        self.cls_tower, self.box_tower = conv_tower(channels, convs), conv_tower(channels, convs)
        self.cls = nn.Conv2d(channels, 1, 3, padding=1)
        self.box = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(levels))
        self.dgqp = DGQP(reg_max, reg_topk, dgqp_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01

    def forward(self, features: list[torch.Tensor]) -> DetectorOutputs:
        scores, box_logits = [], []
        for feature, scale in zip(features, self.scales, strict=True):
            logits = scale(self.box(self.box_tower(feature)))
            scores.append(torch.sigmoid(self.cls(self.cls_tower(feature))) * self.dgqp(logits))
            box_logits.append(logits)
        return DetectorOutputs(tuple(scores), tuple(box_logits))


class GFLDetector(nn.Module):
    """ATSS + GFLv2 one-class detector on a timm encoder and a torchvision FPN (see the module docstring)."""

    def __init__(self, encoder: nn.Module, channels: int = 256, levels: int = 3, head_convs: int = 4,
                 reg_max: int = 16, reg_topk: int = 4, dgqp_channels: int = 64, anchor_scale: float = 8.0) -> None:
        super().__init__()
        if levels not in (3, 5):
            raise ValueError(f"levels must be 3 (P3-P5) or 5 (P3-P7), got {levels}")
        self.encoder = encoder
        strides = list(encoder.feature_info.reduction())
        self.strides = strides + [strides[-1] * 2, strides[-1] * 4][: levels - 3]
        extra = LastLevelP6P7(channels, channels) if levels == 5 else None
        self.fpn = FeaturePyramidNetwork(list(encoder.feature_info.channels()), channels, extra_blocks=extra)
        self.head = GFLHead(channels, levels, head_convs, reg_max, reg_topk, dgqp_channels)
        self.reg_max, self.anchor_scale = reg_max, anchor_scale

    def forward(self, x: torch.Tensor) -> DetectorOutputs:
        features = self.encoder(x)
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        return self.head(list(pyramid.values()))

    def anchors(self, outputs: DetectorOutputs) -> AnchorGrid:
        """The anchors of ``outputs``' feature maps."""
        sizes = [tuple(s.shape[-2:]) for s in outputs.scores]
        return anchor_grid(sizes, self.strides, self.anchor_scale, device=outputs.scores[0].device)

    def flatten(self, outputs: DetectorOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per anchor, levels concatenated: scores N x A and box logits N x A x 4 x (reg_max + 1)."""
        n = outputs.scores[0].shape[0]
        scores = torch.cat([s.flatten(1) for s in outputs.scores], dim=1)
        logits = [b.reshape(n, 4, self.reg_max + 1, -1).permute(0, 3, 1, 2) for b in outputs.box_logits]
        return scores, torch.cat(logits, dim=1)

    def boxes(self, outputs: DetectorOutputs, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded boxes N x A x 4 (clipped to ``image_size`` (height, width)) and scores N x A, before NMS."""
        grid = self.anchors(outputs)
        scores, logits = self.flatten(outputs)
        boxes = distances_to_boxes(grid.centres, expected_distances(logits) * grid.strides[:, None])
        return clip_boxes_to_image(boxes, image_size), scores

    def decode(self, outputs: DetectorOutputs, image_size: tuple[int, int], score_threshold: float = 0.05,
               nms_iou: float = 0.6, max_detections: int = 100, pre_nms: int = 1000) -> list[Detections]:
        """Per image: boxes scoring above ``score_threshold``, the best ``pre_nms`` of them through NMS at
        ``nms_iou``, the best ``max_detections`` kept (GFL's test settings by default)."""
        boxes, scores = self.boxes(outputs, image_size)
        return [postprocess(b, s, score_threshold, nms_iou, max_detections, pre_nms) for b, s in zip(boxes, scores)]


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, nms_iou: float,
                max_detections: int, pre_nms: int = 1000) -> Detections:
    """One image's decoded boxes (A x 4) and scores (A) after thresholding and NMS (also the step that
    follows the exported ONNX graph, which stops before NMS)."""
    keep = scores > score_threshold
    boxes, scores = boxes[keep], scores[keep]
    top = scores.topk(min(pre_nms, len(scores))).indices
    boxes, scores = boxes[top], scores[top]
    kept = nms(boxes, scores, nms_iou)[:max_detections]
    return Detections(boxes[kept], scores[kept])


@register_method(
    "gfl_atss",
    paper=PAPER,
    task="detection",
    test_kwargs={"encoder": "test_efficientnet", "channels": 16, "head_convs": 1, "reg_max": 8, "dgqp_channels": 8},
)
def build_gfl_atss(
    encoder: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "offline",
    channels: int = 256,
    levels: int = 3,
    head_convs: int = 4,
    reg_max: int = 16,
    reg_topk: int = 4,
    dgqp_channels: int = 64,
    anchor_scale: float = 8.0,
) -> GFLDetector:
    """``channels``/``head_convs``/``reg_max``/``reg_topk``/``dgqp_channels`` default to GFLv2's (256, 4, 16, 4, 64)."""
    return GFLDetector(create_encoder(encoder, pretrained, out_indices=(2, 3, 4)), channels, levels, head_convs,
                       reg_max, reg_topk, dgqp_channels, anchor_scale)
