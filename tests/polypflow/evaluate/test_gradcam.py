"""Grad-CAM for registered methods: target-layer lookup, heatmaps, overlays, panels on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import build_model, method_entry
from polypflow.evaluate.gradcam import find_target_layer, gradcam_heatmap, overlay, save_panels
from polypflow.train.losses import build_loss

SIZE = 64


def tiny(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, pretrained="none", **{**method_entry(name).test_kwargs, **kwargs})


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[:, :, 16:48, 20:44] = 1
    image[:, 0][mask[:, 0] > 0] += 0.5
    return image, mask


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny UNet fitted for a few steps to a toy image whose polyp is redder."""
    model = tiny("unet_r34_gradcam").train()
    image, mask = toy_batch()
    loss_fn, optimizer = build_loss("bce_dice"), torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        optimizer.zero_grad()
        loss_fn(model(image), mask).backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("name", ["unet", "unet_r34_gradcam"])
def test_default_target_is_the_last_decoder_conv(name):
    model = tiny(name)
    layer = find_target_layer(model)
    assert layer is model.net.decoder.blocks[-1].conv2[0]
    assert layer is not model.net.segmentation_head[0]


@pytest.mark.quick
def test_target_layer_by_dotted_path_and_model_attribute():
    model = tiny("unet")
    assert find_target_layer(model, "net.decoder.blocks.3") is model.net.decoder.blocks[3]
    hrnet = tiny("hrnet_lowrank")
    assert find_target_layer(hrnet) is hrnet.lowrank
    assert find_target_layer(tiny("hrnet_lowrank", lowrank=False)).__class__ is nn.Sequential


def test_heatmap_shape_range_and_no_side_effects():
    model = tiny("unet").train()
    heatmap = gradcam_heatmap(model, torch.rand(3, SIZE, 2 * SIZE))
    assert heatmap.shape == (SIZE, 2 * SIZE) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


def test_heatmap_of_a_trained_model_is_informative(trained):
    image, mask = toy_batch()
    heatmap = gradcam_heatmap(trained, image[0])
    assert heatmap.std() > 0.05 and heatmap.max() == pytest.approx(1.0, abs=1e-3)
    inside = mask[0, 0].numpy() > 0
    assert heatmap[inside].mean() > heatmap[~inside].mean()


def test_heatmap_for_hrnet_lowrank_main_map():
    heatmap = gradcam_heatmap(tiny("hrnet_lowrank"), torch.rand(1, 3, SIZE, SIZE), "fuse")
    assert heatmap.shape == (SIZE, SIZE) and 0 <= heatmap.min() <= heatmap.max() <= 1


@pytest.mark.quick
def test_overlay_blends_and_outlines_the_mask():
    image = np.full((32, 32, 3), 128, np.uint8)
    heatmap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1
    plain, outlined = overlay(image, heatmap), overlay(image, heatmap, mask)
    assert plain.shape == (32, 32, 3) and plain.dtype == np.uint8
    assert not np.array_equal(plain[0, 0], plain[-1, -1])  # the colour map varies with the heatmap
    assert (outlined[8, 8:24] == (0, 255, 0)).all() and (outlined[16, 16] == plain[16, 16]).all()


def test_save_panels_writes_pngs_atomically(trained, tmp_path):
    image, mask = toy_batch()
    images = [(np.clip(img.permute(1, 2, 0).numpy(), 0, 1) * 255).astype(np.uint8) for img in image[:2]]
    masks = [m[0].numpy() for m in mask[:2]]
    paths = save_panels(trained, images, tmp_path / "panels", masks=masks, names=["a", "b"], normalize="half")
    assert [p.name for p in paths] == ["a.png", "b.png"]
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["a.png", "b.png"]  # no temp files left
    panel = np.asarray(Image.open(paths[0]))
    assert panel.shape == (SIZE, 4 * SIZE, 3)
    np.testing.assert_array_equal(panel[:, :SIZE], images[0])
    assert (panel[:, SIZE : 2 * SIZE, 0] > 0).mean() == pytest.approx(masks[0].mean())
