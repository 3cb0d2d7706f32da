"""CRIS: collaborative refinement integrated with segmentation, and the three strategies it is compared with.

A backbone (UNet, UNet++ or SegNet, built through the registry) predicts a map; a refinement stage
re-predicts it. The four strategies of the paper differ only in the refinement stage and in the
recipe's loss (see :class:`CRIS`); the interleaved dual loss lives in :mod:`polypflow.train.losses`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models import segnet, unet, unetpp  # noqa: F401  (registers the backbones)
from models.encoders import Pretrained
from models.registry import build_model, register_method

Strategy = Literal["backbone", "backbone_fcn", "backbone_crf", "cris"]
STRATEGIES: tuple[str, ...] = ("backbone", "backbone_fcn", "backbone_crf", "cris")
BACKBONES: tuple[str, ...] = ("unet", "unetpp", "segnet")


class RefinementFCN(nn.Module):
    """CRIS's refinement module: a small FCN on the backbone's probability map, returning logits.

    Paper (CRIS, METHODS.md section 2): 1x1 convolutions expand the channels, then convolutions of
    decreasing kernel size, dropout p (0.01) after each block, sigmoid output. The paper gives no
    widths; ours are ``1 -> w/2 -> w`` (1x1), ``7x7 w -> w``, ``5x5 w -> w/2``, ``3x3 w/2 -> w/4``,
    each conv + ReLU + dropout, and a final 1x1 conv to one logit map (the sigmoid is applied by the
    loss and the export head, as for every method).
    """

    def __init__(self, width: int = 16, dropout: float = 0.01) -> None:
        super().__init__()
        if width < 4 or width % 4:
            raise ValueError(f"refinement width must be a positive multiple of 4, got {width}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        half, quarter = width // 2, width // 4
        blocks = [(1, 1, half), (1, half, width), (7, width, width), (5, width, half), (3, half, quarter)]
        self.blocks = nn.Sequential(*(self.block(k, cin, cout, dropout) for k, cin, cout in blocks))
        self.out = nn.Conv2d(width // 4, 1, 1)

    @staticmethod
    def block(kernel: int, in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.sigmoid(logits)))


class MeanFieldCRF(nn.Module):
    """A differentiable mean-field CRF over two labels refining a logit map (the Backbone+CRF strategy).

    Simplified from S. Zheng et al., "Conditional Random Fields as Recurrent Neural Networks",
    ICCV 2015 (itself mean-field inference of Krähenbühl & Koltun's dense CRF). Each of
    ``iterations`` steps: message passing with a Gaussian spatial kernel (std gamma px) and an
    appearance kernel (spatial std alpha px, colour std beta on the network's input image), a learned
    weighted sum of the two, a learned 2x2 label-compatibility transform (Potts at initialisation),
    and the update ``logit = unary - pairwise_fg + pairwise_bg``. Kernel widths, weights and the
    compatibility matrix are learned. Simplifications, to stay light and ONNX-exportable (only
    Conv / Pad / elementwise ops):

    * a local ``window`` x ``window`` neighbourhood instead of the fully connected graph (no
      permutohedral lattice); neighbours are gathered by a fixed one-hot convolution on a
      replicate-padded map, so borders see their own edge pixels as neighbours;
    * both kernels are normalised to sum to one over the window (centre excluded), so the pairwise
      term is bounded by the kernel weights and does not grow with the window;
    * two labels only: the background's message is the kernel's total minus the foreground's.
    """

    def __init__(
        self, window: int = 7, iterations: int = 5, gamma: float = 3.0, alpha: float = 3.0, beta: float = 0.5
    ) -> None:
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError(f"CRF window must be odd and >= 3, got {window}")
        self.window, self.iterations = window, iterations
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))
        self.kernel_weights = nn.Parameter(torch.ones(2))  # spatial, appearance
        self.compatibility = nn.Parameter(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # Potts
        taps = window * window
        self.register_buffer("one_hot", torch.eye(taps).reshape(taps, 1, window, window), persistent=False)
        offsets = torch.arange(window, dtype=torch.float32) - window // 2
        dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).reshape(1, taps, 1, 1)
        self.register_buffer("dist2", dist2, persistent=False)

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``N x C x window² x H x W``: each pixel's window, edge-replicated."""
        channels = x.shape[1]
        padded = F.pad(x, [self.window // 2] * 4, mode="replicate")
        gathered = F.conv2d(padded, self.one_hot.repeat(channels, 1, 1, 1), groups=channels)
        return gathered.unflatten(1, (channels, self.window * self.window))

    def kernel(self, image: torch.Tensor) -> torch.Tensor:
        """The weighted, normalised sum of both kernels: ``N x window² x H x W``."""
        not_centre = (self.dist2 > 0).to(image.dtype)
        spatial = torch.exp(-self.dist2 / (2 * torch.exp(2 * self.log_gamma))) * not_centre
        colour2 = (self.neighbours(image) - image.unsqueeze(2)).pow(2).sum(dim=1)
        appearance = torch.exp(
            -self.dist2 / (2 * torch.exp(2 * self.log_alpha)) - colour2 / (2 * torch.exp(2 * self.log_beta))
        ) * not_centre
        spatial = spatial / spatial.sum(dim=1, keepdim=True)
        tiny = torch.finfo(appearance.dtype).tiny  # 0/tiny = 0 where no neighbour shares the colour (fp16 too)
        appearance = appearance / appearance.sum(dim=1, keepdim=True).clamp_min(tiny)
        return self.kernel_weights[0] * spatial + self.kernel_weights[1] * appearance

    def forward(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel(image)
        total = kernel.sum(dim=1, keepdim=True)
        logits = unary
        for _ in range(self.iterations):
            message_fg = (kernel * self.neighbours(torch.sigmoid(logits))[:, 0]).sum(dim=1, keepdim=True)
            messages = torch.cat([total - message_fg, message_fg], dim=1)  # background, foreground
            pairwise = F.conv2d(messages, self.compatibility[:, :, None, None])
            logits = unary - pairwise[:, 1:] + pairwise[:, :1]
        return logits


class CRIS(nn.Module):
    """CRIS and its comparison strategies around one segmentation backbone.

    Paper: CRIS — collaborative refinement integrated with segmentation (METHODS.md section 2).
    ``strategy``:

    * ``backbone``: the backbone alone, outputs ``(backbone,)``;
    * ``backbone_fcn``: :class:`RefinementFCN` on the backbone's probability map, outputs
      ``(refined, backbone)``, trained jointly on the final map only (recipe ``bce``, weights [1, 0]);
    * ``cris``: same layers and outputs, trained with the interleaved dual loss (recipe
      ``cris_interleaved``: even epochs MSE on the backbone map, odd epochs BCE on the refined map);
    * ``backbone_crf``: :class:`MeanFieldCRF` on the backbone's logits and the input image, outputs
      ``(crf, backbone)``, trained end to end on the CRF's map (recipe ``bce``, weights [1, 0]).

    The refined map is not detached from the backbone: on odd epochs L2 reaches both (our reading
    of "collaborative"). ``threshold`` (a buffer, saved in the state dict) holds the binarisation
    threshold the trainer grid-searches on the training set; the model itself never applies it.
    """

    def __init__(self, backbone: nn.Module, strategy: Strategy, head: nn.Module | None) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown CRIS strategy {strategy!r}; known: {list(STRATEGIES)}")
        if (head is None) != (strategy == "backbone"):
            raise ValueError(f"strategy {strategy!r} {'needs' if head is None else 'takes no'} refinement head")
        self.backbone, self.strategy, self.head = backbone, strategy, head
        self.register_buffer("threshold", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        coarse = self.backbone(x)[0]
        if self.head is None:
            return (coarse,)
        refined = self.head(coarse, x) if self.strategy == "backbone_crf" else self.head(coarse)
        return refined, coarse


def refinement_head(
    strategy: Strategy, dropout: float, refine_width: int, crf_window: int, crf_iterations: int
) -> nn.Module | None:
    if strategy == "backbone":
        return None
    if strategy == "backbone_crf":
        return MeanFieldCRF(window=crf_window, iterations=crf_iterations)
    return RefinementFCN(width=refine_width, dropout=dropout)


@register_method(
    "cris",
    paper="CRIS: collaborative refinement integrated with segmentation for polyp segmentation",
    test_kwargs={
        "backbone": "unet",
        "backbone_kwargs": {"encoder": "test_efficientnet", "decoder_channels": (16, 8, 8, 8, 8)},
        "refine_width": 8,
    },
)
def build_cris(
    backbone: str = "unet",
    backbone_kwargs: dict[str, Any] | None = None,
    strategy: Strategy = "cris",
    dropout: float = 0.01,
    pretrained: Pretrained = "none",
    refine_width: int = 16,
    crf_window: int = 7,
    crf_iterations: int = 5,
) -> CRIS:
    """``pretrained`` goes to the backbone ("none" by default: the paper trains from scratch)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown CRIS backbone {backbone!r}; known: {list(BACKBONES)}")
    backbone_kwargs = dict(backbone_kwargs or {})
    if "pretrained" in backbone_kwargs:
        raise ValueError("set cris's own `pretrained`, not backbone_kwargs.pretrained")
    net = build_model(backbone, pretrained=pretrained, **backbone_kwargs)
    head = refinement_head(strategy, dropout, refine_width, crf_window, crf_iterations)
    return CRIS(net, strategy, head)
