"""PraNet and PraNet(IF): RFB/PD shapes, the reverse-attention weight, IF wiring and output arity."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.info_fusion import InformationFusion
from models.pranet import RFB, PartialDecoder, PraNet, ReverseAttention, reverse_weight

TINY = {"pretrained": "none", "encoder": "test_resnet", "channels": 8}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_rfb_keeps_size_and_sets_channels():
    out = RFB(12, 8).eval()(torch.rand(2, 12, 9, 11))
    assert out.shape == (2, 8, 9, 11)
    assert (out >= 0).all()  # ends in a ReLU


def test_partial_decoder_predicts_one_map_at_the_finest_level():
    c = 8
    levels = [torch.rand(2, c, 16, 16), torch.rand(2, c, 8, 8), torch.rand(2, c, 4, 4)]
    assert PartialDecoder(c).eval()(*levels).shape == (2, 1, 16, 16)


def test_reverse_weight_is_one_minus_sigmoid_on_crafted_map():
    previous = torch.tensor([[[[-20.0, 0.0], [20.0, 2.0]]]])
    weight = reverse_weight(previous, previous)
    expected = torch.tensor([[[[1.0, 0.5], [0.0, 1 - torch.sigmoid(torch.tensor(2.0)).item()]]]])
    torch.testing.assert_close(weight, expected)
    # a confident foreground map (large logits) erases the features, background keeps them
    assert reverse_weight(torch.full((1, 1, 2, 2), 30.0), torch.zeros(1, 4, 8, 8)).max() < 1e-6


def test_reverse_attention_feeds_weighted_features_and_adds_a_residual():
    branch = ReverseAttention(cin=4, width=6, kernel=3, depth=2, out_kernel=3).eval()
    features = torch.rand(1, 4, 8, 8) + 0.5
    previous = torch.randn(1, 1, 4, 4) * 3
    seen = {}
    branch.body[0].register_forward_hook(lambda _m, inputs, _o: seen.update(x=inputs[0]))
    with torch.no_grad():
        out = branch(features, previous)
        up = torch.nn.functional.interpolate(previous, size=(8, 8), mode="bilinear", align_corners=False)
        residual = branch.out(branch.body(seen["x"]))
    torch.testing.assert_close(seen["x"], (1 - torch.sigmoid(up)) * features)
    torch.testing.assert_close(out, up + residual)


@pytest.mark.parametrize(("name", "arity"), [("pranet", 4), ("pranet_if", 2)])
def test_output_arity_and_sizes(name, arity):
    torch.manual_seed(0)
    model = build_model(name, **TINY).eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 96, 64))
    assert len(outputs) == arity
    assert all(out.shape == (1, 1, 96, 64) for out in outputs)


def test_if_variant_replaces_reverse_attention_by_information_fusion():
    plain, fused = build_model("pranet", **TINY), build_model("pranet_if", **TINY)
    assert isinstance(fused, PraNet) and fused.info_fusion
    assert not any(isinstance(m, ReverseAttention) for m in fused.modules())
    assert sum(isinstance(m, ReverseAttention) for m in plain.modules()) == 3
    assert sum(isinstance(m, InformationFusion) for m in fused.modules()) == 1
    ra = n_params(plain.reverse)
    fusion = n_params(InformationFusion([8, 1, 8, 8], 8)) + n_params(torch.nn.Conv2d(8, 1, 1))
    assert n_params(fused) == n_params(plain) - ra + fusion


def test_pranet_if_alias_is_pranet_with_info_fusion():
    torch.manual_seed(0)
    alias = build_model("pranet_if", **TINY)
    torch.manual_seed(0)
    direct = build_model("pranet", info_fusion=True, **TINY)
    assert alias.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(alias.state_dict().values(), direct.state_dict().values()))


def test_ra_widths_follow_the_paper_by_default():
    model = build_model("pranet", **TINY)  # default ra_channels (64, 64, 256) on a tiny encoder
    widths = [branch.body[0][0].out_channels for branch in model.reverse]
    kernels = [branch.body[1][0].kernel_size for branch in model.reverse]
    assert widths == [64, 64, 256]
    assert kernels == [(3, 3), (3, 3), (5, 5)]
