"""HRNet + low-rank module (METHODS.md section 3): the module's shapes, its rank bound, the switch."""

from __future__ import annotations

import pytest
import torch

from models import build_model, method_entry
from models.hrnet_lowrank import LowRankModule

TINY = method_entry("hrnet_lowrank").test_kwargs


def test_lowrank_module_shapes_and_convex_assignments():
    torch.manual_seed(0)
    module = LowRankModule(channels=12, rank=5)
    fp = torch.randn(2, 12, 8, 6)
    fa = module.attention(fp)
    assert fa.shape == (2, 8 * 6, 5)
    torch.testing.assert_close(fa.sum(-1), torch.ones(2, 48))  # softmax over the D bases
    assert module(fp).shape == fp.shape


def test_lowrank_module_matches_the_paper_formula():
    torch.manual_seed(0)
    module = LowRankModule(channels=6, rank=3)
    fp = torch.randn(1, 6, 4, 5)
    x = fp[0].flatten(1).T  # (HW, C)
    fa = module.attention(fp)[0]
    bases = x.T @ fa / x.shape[0]  # b = (1/N) F_p^T F_a, N = HW
    expected = (fa @ bases.T).T.reshape(6, 4, 5)
    torch.testing.assert_close(module(fp)[0], expected)


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_bounds_the_rank_of_fl(rank):
    torch.manual_seed(0)
    channels = 16
    module = LowRankModule(channels=channels, rank=rank).double()
    fp = torch.randn(3, channels, 7, 7, dtype=torch.float64)
    assert all(torch.linalg.matrix_rank(f.flatten(1)) == channels for f in fp)  # full rank going in
    for fl in module(fp):
        assert torch.linalg.matrix_rank(fl.flatten(1)) <= rank


def test_lowrank_switch_sets_the_outputs():
    torch.manual_seed(0)
    with_module = build_model("hrnet_lowrank", pretrained="none", **TINY).eval()
    baseline = build_model("hrnet_lowrank", pretrained="none", **{**TINY, "lowrank": False}).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert [o.shape for o in with_module(x)] == [(1, 1, 64, 96)] * 2
        assert [o.shape for o in baseline(x)] == [(1, 1, 64, 96)]
    assert baseline.lowrank is None and not any("lowrank" in k for k in baseline.state_dict())
    assert any(k.startswith("lowrank.phi") for k in with_module.state_dict())


def test_encoder_channels_come_from_feature_info():
    model = build_model("hrnet_lowrank", pretrained="none", **{**TINY, "channels": None})
    channels = sum(model.encoder.feature_info.channels())
    assert model.fuse[0].in_channels == channels == model.fuse[0].out_channels
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 32]


def test_any_multiscale_timm_encoder_works():
    model = build_model("hrnet_lowrank", pretrained="none", encoder="resnet18", channels=8, rank=2).eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape for o in outputs] == [(1, 1, 64, 64)] * 2


def test_main_map_comes_from_fl():
    """Changing the F_l head changes only the first output; the F_p head only the second."""
    torch.manual_seed(0)
    model = build_model("hrnet_lowrank", pretrained="none", **TINY).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.head_l[1].bias += 1.0
        after = model(x)
    torch.testing.assert_close(after[0], before[0] + 1.0)
    torch.testing.assert_close(after[1], before[1])
