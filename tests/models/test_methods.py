"""One parametrised test over every registered method: shapes, a training step, ONNX parity."""

from __future__ import annotations

import pytest
import torch

from models import build_model, list_methods, method_entry
from polypflow.losses import build_loss
from polypflow.onnx_export import export_onnx, parity

SIZE = 64


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"pretrained": "none", **method_entry(name).test_kwargs}
    return build_model(name, **kwargs)


def test_unknown_method_lists_known_ones():
    with pytest.raises(KeyError, match="registered: .*unet"):
        build_model("no_such_method")


@pytest.mark.parametrize("name", list_methods())
def test_forward_contract(name):
    model = tiny(name).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, SIZE, SIZE))
    assert isinstance(outputs, tuple) and len(outputs) >= 1
    for out in outputs:
        assert out.shape == (2, 1, SIZE, SIZE)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_methods())
def test_training_step_lowers_loss(name):
    model = tiny(name).train()
    image = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[:, :, 16:48, 20:44] = 1
    image[:, 0][mask[:, 0] > 0] += 0.5  # a learnable cue: the polyp is redder
    loss_fn = build_loss("bce_dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model(image), mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", list_methods())
def test_onnx_export_parity(name, tmp_path):
    model = tiny(name).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=SIZE)
    assert parity(model, path, image_size=SIZE, batch=3) < 1e-3
