"""Information-Fusion variants: parameter accounting, FRU identity, fused shapes, decoder hooks."""

from __future__ import annotations

import copy

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from models import build_model, method_entry
from models.fcn import FCN8sHead
from models.if_nets import DecoderTap
from models.info_fusion import FeatureRefinementUnit, InformationFusion
from models.unet import smp_model

SIZE = 64
DECODER = (32, 16, 16, 8, 8)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, **{"pretrained": "none", **method_entry(name).test_kwargs, **overrides}).eval()


def fusion_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Run ``model`` once and return the feature list its IF block received."""
    seen: list[list[torch.Tensor]] = []
    handle = model.get_submodule(fusion_path(model)).register_forward_hook(
        lambda module, args, output: seen.append(list(args[0]))
    )
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    handle.remove()
    assert len(seen) == 1
    return seen[0]


def fusion_path(model: nn.Module) -> str:
    paths = [name for name, m in model.named_modules() if isinstance(m, InformationFusion)]
    assert len(paths) == 1, paths
    return paths[0]


def test_fru_is_identity_with_zero_convs():
    fru = FeatureRefinementUnit(6)
    x = torch.randn(2, 6, 8, 8)
    assert not torch.allclose(fru(x), x)
    for conv in (m for m in fru.modules() if isinstance(m, nn.Conv2d)):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    torch.testing.assert_close(fru(x), x)


def test_fusion_output_at_finest_level():
    fusion = InformationFusion([8, 16, 32], 12)
    features = [torch.rand(3, 8, 40, 24), torch.rand(3, 16, 20, 12), torch.rand(3, 32, 5, 3)]
    assert fusion(features).shape == (3, 12, 40, 24)


def test_fusion_sums_every_level():
    fusion = InformationFusion([4, 4], 4).eval()
    features = [torch.rand(1, 4, 8, 8), torch.rand(1, 4, 4, 4)]
    with torch.no_grad():
        base = fusion(features)
        changed = fusion([features[0], features[1] + 1.0])
    assert not torch.allclose(base, changed)  # the coarse level reaches the output


@pytest.mark.parametrize(
    ("name", "arch"), [("unet_if", smp.Unet), ("unetpp_if", smp.UnetPlusPlus)]
)
def test_smp_if_adds_exactly_the_if_block(name, arch):
    plain = smp_model(arch, "test_efficientnet", "none", decoder_channels=DECODER)
    expected = count(InformationFusion(DECODER[::-1], DECODER[-1]))
    assert count(tiny(name)) - count(plain) == expected


def test_resunetpp_if_adds_exactly_the_if_block():
    base = 4
    expected = count(InformationFusion([2 * base, 4 * base, 8 * base], 2 * base))
    added = count(tiny("resunetpp_if", base_channels=base)) - count(tiny("resunetpp", base_channels=base))
    assert added == expected
    assert count(tiny("resunetpp", info_fusion=True)) == count(tiny("resunetpp_if"))


def test_fcn_if_swaps_score_layers_for_the_if_head():
    plain, fused = tiny("fcn"), tiny("fcn_if")
    channels = plain.encoder.feature_info.channels()
    fuse = method_entry("fcn_if").test_kwargs["fuse_channels"]
    head = count(InformationFusion(channels, fuse)) + count(nn.Conv2d(fuse, 1, 1))
    assert count(fused.encoder) == count(plain.encoder)
    assert count(fused) - count(plain) == head - count(FCN8sHead(channels[1:]))


@pytest.mark.parametrize(
    ("name", "channels", "sizes"),
    [
        ("unet_if", DECODER[::-1], [64, 32, 16, 8, 4]),
        ("unetpp_if", DECODER[::-1], [64, 32, 16, 8, 4]),
        ("resunetpp_if", (8, 16, 32), [64, 32, 16]),
        ("fcn_if", (24, 32, 48, 64), [16, 8, 4, 2]),
    ],
)
def test_if_receives_every_level_fine_first(name, channels, sizes):
    features = fusion_inputs(tiny(name))
    assert [f.shape[1] for f in features] == list(channels)
    assert [f.shape[-1] for f in features] == sizes


def test_unetpp_taps_the_top_row_of_the_nested_decoder():
    model = tiny("unetpp_if")
    hooked = [m for m in model.net.decoder.blocks.values() if m._forward_hooks]
    assert hooked == [model.net.decoder.blocks[f"x_0_{j}"] for j in range(5)]


def test_prediction_reads_the_fused_map():
    model = tiny("unet_if")
    with torch.no_grad():
        before = model(torch.ones(1, 3, SIZE, SIZE))[0]
        nn.init.zeros_(model.fusion.fuse[-1].weight)
        nn.init.zeros_(model.fusion.fuse[-1].bias)
        after = model(torch.ones(1, 3, SIZE, SIZE))[0]
    assert not torch.allclose(before, after)
    head = model.net.segmentation_head
    torch.testing.assert_close(after, head(torch.zeros(1, DECODER[-1], SIZE, SIZE)))


def test_decoder_tap_reports_a_level_that_did_not_run():
    blocks = [nn.Identity(), nn.Identity()]
    tap = DecoderTap(blocks)
    blocks[0](torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"levels \[1\]"):
        tap.pop()


def test_deep_copy_keeps_its_own_hooks():
    model = tiny("unet_if")
    clone = copy.deepcopy(model)
    assert clone.tap is not model.tap
    with torch.no_grad():
        assert clone(torch.rand(1, 3, SIZE, SIZE))[0].shape == (1, 1, SIZE, SIZE)
    assert model.tap.outputs == {} and clone.tap.outputs == {}


def test_resunetpp_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="from scratch"):
        build_model("resunetpp", pretrained="offline")
