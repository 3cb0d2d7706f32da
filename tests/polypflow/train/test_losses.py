"""The one loss module: every criterion falls toward a perfect prediction, the structure loss weights
boundaries, deep supervision sums weighted maps, and CRIS alternates MSE and BCE by epoch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polypflow.train.losses import MAP_LOSSES, build_loss, cris_active_loss, structure

pytestmark = pytest.mark.quick


def square_mask(size: int = 32, batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 4:3 * size // 4, size // 3:5 * size // 6] = 1
    return mask


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_loss_falls_toward_perfect_prediction(name):
    mask = square_mask()
    loss = build_loss(name)
    values = [loss((k * (2 * mask - 1),), mask).item() for k in (-4.0, -1.0, 0.0, 1.0, 3.0, 20.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(0.0, abs=1e-3)  # confident and right: (almost) nothing to learn


@pytest.mark.parametrize("name", sorted(MAP_LOSSES))
def test_loss_is_differentiable_and_finite_on_random_logits(name):
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    value = build_loss(name)((logits,), square_mask())
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def hand_structure(logits: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """The F3Net/PraNet structure loss written out pixel by pixel (zero padding counted in the mean)."""
    n, _, h, w = mask.shape
    r = kernel // 2
    padded = F.pad(mask, (r, r, r, r))
    local = torch.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            local[:, :, i, j] = padded[:, :, i:i + kernel, j:j + kernel].sum(dim=(2, 3)) / kernel**2
    weight = 1 + 5 * (local - mask).abs()
    p = torch.sigmoid(logits)
    bce = -(mask * torch.log(p) + (1 - mask) * torch.log(1 - p))
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    inter = (p * mask * weight).sum(dim=(2, 3))
    union = ((p + mask) * weight).sum(dim=(2, 3))
    return (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()


def test_structure_loss_matches_hand_computation():
    mask = square_mask(size=16)
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert structure(logits, mask).item() == pytest.approx(hand_structure(logits, mask, kernel=3).item(), rel=1e-5)


def one_wrong_pixel(mask: torch.Tensor, row: int, col: int) -> torch.Tensor:
    logits = 8 * (2 * mask - 1)
    logits[:, :, row, col] *= -1
    return logits


def test_structure_loss_weights_boundary_errors_more():
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    boundary, interior = one_wrong_pixel(mask, 8, 16), one_wrong_pixel(mask, 16, 16)
    outside_edge, far_outside = one_wrong_pixel(mask, 7, 16), one_wrong_pixel(mask, 1, 16)
    bce = MAP_LOSSES["bce"]
    assert bce(boundary, mask).item() == pytest.approx(bce(interior, mask).item())  # plain BCE: equal cost
    assert structure(boundary, mask) > 1.5 * structure(interior, mask)
    assert structure(outside_edge, mask) > 1.5 * structure(far_outside, mask)


def test_structure_kernel_is_31_pixels_at_352():
    """PraNet averages over 31x31 at 352 px: an error 16 columns from the edge is not up-weighted, 15 is."""
    size, edge = 352, 176
    mask = torch.zeros(1, 1, size, size)
    mask[..., :edge] = 1
    far = structure(one_wrong_pixel(mask, edge, 100), mask).item()
    assert structure(one_wrong_pixel(mask, edge, edge - 16), mask).item() == pytest.approx(far, rel=1e-6)
    assert structure(one_wrong_pixel(mask, edge, edge - 15), mask).item() > far * (1 + 1e-3)


def test_deep_supervision_weighted_sum():
    mask = square_mask()
    maps = tuple(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    bce = MAP_LOSSES["bce"]
    expected = 1.0 * bce(maps[0], mask) + 0.5 * bce(maps[1], mask) + 0.25 * bce(maps[2], mask)
    assert build_loss("bce", [1.0, 0.5, 0.25])(maps, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = sum(bce(m, mask) for m in maps)
    assert build_loss("bce")(maps, mask).item() == pytest.approx(unweighted.item(), rel=1e-6)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5], [1.0, 0.5, 0.5, 0.5]])
def test_deep_supervision_weight_count_mismatch_raises(weights):
    maps = (torch.zeros(1, 1, 8, 8),) * 3
    with pytest.raises(ValueError, match=f"{len(weights)} deep-supervision weights for 3 output maps"):
        build_loss("structure", weights)(maps, torch.zeros(1, 1, 8, 8))


def test_unknown_loss_raises_with_known_names():
    with pytest.raises(ValueError, match="unknown loss 'focal'") as info:
        build_loss("focal")
    assert all(name in str(info.value) for name in [*MAP_LOSSES, "cris_interleaved"])


def test_cris_interleaved_uses_mse_on_even_epochs_and_bce_on_odd():
    mask = square_mask()
    refined = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    backbone = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = build_loss("cris_interleaved")
    mse = F.mse_loss(torch.sigmoid(backbone), mask).item()
    bce = F.binary_cross_entropy_with_logits(refined, mask).item()
    assert mse != pytest.approx(bce)
    for epoch in range(4):
        refined.grad = backbone.grad = None
        value = loss((refined, backbone), mask, epoch)
        value.backward()
        if epoch % 2 == 0:
            assert cris_active_loss(epoch) == "L1"
            assert value.item() == pytest.approx(mse) and refined.grad is None and backbone.grad is not None
        else:
            assert cris_active_loss(epoch) == "L2"
            assert value.item() == pytest.approx(bce) and backbone.grad is None and refined.grad is not None


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (352, 352)])
def test_boundary_weight_is_the_square_box_mean(size):
    """The separable box filter equals PraNet's k x k avg_pool2d (zero padding counted) to float precision."""
    from polypflow.train.losses import boundary_weight

    mask = (torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    kernel = max(3, (min(size) * 31 // 352) | 1)
    square = 1 + 5 * torch.abs(torch.nn.functional.avg_pool2d(mask, kernel, stride=1, padding=kernel // 2) - mask)
    assert torch.allclose(boundary_weight(mask), square, atol=1e-5)


def test_deep_supervised_structure_shares_one_weight_map():
    mask = square_mask()
    maps = tuple(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = sum(structure(m, mask) for m in maps)
    assert build_loss("structure")(maps, mask).item() == pytest.approx(expected.item(), rel=1e-6)
