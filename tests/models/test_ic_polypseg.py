"""IC-PolypSeg building blocks (RFE, PFR, CPFR, CFC), ablation switches and the decoder's size."""

from __future__ import annotations

import pytest
import torch

from models.ic_polypseg import (
    CrossStagePFR,
    ICPolypSeg,
    PixelwiseFeatureRedistribution,
    ReceptiveFieldExpanding,
    build_ic_polypseg,
    holistic_kernel,
)

TINY = {"encoder": "test_efficientnet", "pretrained": "none", "channels": 8}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pfr_blocks(model: torch.nn.Module) -> int:
    return sum(isinstance(m, PixelwiseFeatureRedistribution) for m in model.modules())


def tiny(**switches: bool) -> ICPolypSeg:
    torch.manual_seed(0)
    return build_ic_polypseg(**TINY, **switches).eval()


def test_rfe_keeps_size_of_non_square_maps_and_sets_channels():
    out = ReceptiveFieldExpanding(24, 16)(torch.rand(2, 24, 12, 20))
    assert out.shape == (2, 16, 12, 20)


def test_holistic_kernel_is_the_normalised_flat_product():
    q, k = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    expected = torch.bmm(q.reshape(3, 1, -1), k.reshape(3, -1, 1)) / (4 * 5 * 6)
    assert holistic_kernel(q, k).shape == (3, 1, 1)
    torch.testing.assert_close(holistic_kernel(q, k), expected)


def test_pfr_rescales_value_by_one_scalar_per_sample():
    pfr = PixelwiseFeatureRedistribution(8).eval()
    x = torch.randn(2, 8, 6, 10)
    out = pfr(x)
    query, key, value = pfr.qkv(x).chunk(3, dim=1)
    assert out.shape == x.shape
    torch.testing.assert_close(out, holistic_kernel(query, key).view(2, 1, 1, 1) * value)


def test_pfr_stays_finite_on_large_inputs():
    torch.manual_seed(0)
    out = PixelwiseFeatureRedistribution(32)(1e6 * torch.rand(2, 32, 88, 88))
    assert torch.isfinite(out).all()
    # float16: the unnormalised product of 64*88*88 terms of 1e4 overflows, the normalised one does not
    q = k = torch.full((1, 64, 88, 88), 100.0, dtype=torch.float16)
    naive = torch.bmm(q.reshape(1, 1, -1), k.reshape(1, -1, 1))
    assert not torch.isfinite(naive).all()
    assert torch.isfinite(holistic_kernel(q, k)).all()
    assert holistic_kernel(q, k).item() == pytest.approx(1e4, rel=1e-2)


@pytest.mark.parametrize("redistribute", [True, False])
def test_cpfr_fuses_stage_and_upsampled_previous_into_c_channels(redistribute):
    cpfr = CrossStagePFR(8, redistribute=redistribute)
    out = cpfr(torch.rand(2, 8, 16, 24), torch.rand(2, 8, 8, 12))
    assert out.shape == (2, 8, 16, 24)
    assert pfr_blocks(cpfr) == int(redistribute)


def test_outputs_follow_the_contract_on_non_square_input():
    outputs = tiny()(torch.rand(2, 3, 64, 96))
    assert len(outputs) == 5  # P1 (CFC), P2..P5
    assert all(out.shape == (2, 1, 64, 96) for out in outputs)


def test_cfc_adds_a_residual_to_p2():
    model = tiny()
    torch.nn.init.zeros_(model.cfc.residual.weight)
    torch.nn.init.zeros_(model.cfc.residual.bias)
    with torch.no_grad():
        p1, p2, *_ = model(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(p1, p2)


@pytest.mark.parametrize(
    ("switches", "blocks", "outputs"),
    [
        ({}, 8, 5),  # PFR + 3 CPFR in the main decoder and again in the CFC decoder
        ({"cfc": False}, 4, 4),
        ({"pfr": False}, 6, 5),
        ({"cpfr": False}, 2, 5),
        ({"pfr": False, "cpfr": False, "cfc": False}, 0, 4),
    ],
)
def test_ablation_switches_change_modules_and_outputs(switches, blocks, outputs):
    model = tiny(**switches)
    assert pfr_blocks(model) == blocks
    assert (model.cfc is None) == (switches.get("cfc") is False)
    with torch.no_grad():
        assert len(model(torch.rand(1, 3, 64, 64))) == outputs


def test_ablated_model_is_smaller_and_still_trains_all_parameters():
    full, base = tiny(), tiny(pfr=False, cpfr=False, cfc=False).train()
    assert count(base) < count(full)
    sum(out.mean() for out in base(torch.rand(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in base.parameters())


def test_ef0_decoder_size_is_near_the_paper():
    model = build_ic_polypseg(encoder="efficientnet_b0", pretrained="none")
    decoder = count(model) - count(model.encoder)
    print(f"IC-PolypSeg EF0 decoder params: {decoder / 1e6:.3f} M (paper 0.67 M)")
    assert 0.64e6 < decoder < 0.72e6  # measured 0.677 M at the default C = 44


@pytest.mark.parametrize("variant", range(8))
def test_every_efficientnet_variant_builds_with_a_small_decoder(variant):
    """EF0..EF7 = timm efficientnet_b0..b7: the contract holds, the decoder stays near the paper's 0.67-1.01 M."""
    model = build_ic_polypseg(encoder=f"efficientnet_b{variant}", pretrained="none").eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64))
    assert len(outputs) == 5 and all(o.shape == (1, 1, 64, 64) for o in outputs)
    assert 0.6e6 < count(model) - count(model.encoder) < 1.1e6
