"""CRIS strategies, its refinement FCN, the mean-field CRF, the interleaved loss, and SegNet's unpooling export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model
from models.cris import CRIS, MeanFieldCRF, RefinementFCN
from polypflow.train.losses import SegLoss, bce, cris_active_loss, mse_prob
from polypflow.data.images import NORMALIZATION
from polypflow.infer.onnx import DeployGraph, export_onnx, onnx_session, parity, probability

SIZE = 64
TINY_BACKBONES = {
    "segnet": {"base_channels": 4, "depth": 3},
    "unet": {"encoder": "test_efficientnet", "decoder_channels": (16, 8, 8, 8, 8)},
    "unetpp": {"encoder": "test_efficientnet", "decoder_channels": (16, 8, 8, 8, 8)},
}


def tiny_cris(strategy: str = "cris", backbone: str = "segnet", **kwargs) -> CRIS:
    torch.manual_seed(0)
    return build_model(
        "cris", backbone=backbone, backbone_kwargs=TINY_BACKBONES[backbone], strategy=strategy,
        refine_width=8, crf_window=5, crf_iterations=3, pretrained="none", **kwargs,
    )


def batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(n, 1, SIZE, SIZE)
    mask[:, :, 16:48, 20:44] = 1
    return image, mask


def grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


STRATEGY_ARITY = [("backbone", 1), ("backbone_fcn", 2), ("backbone_crf", 2), ("cris", 2)]


@pytest.mark.parametrize(("strategy", "arity"), STRATEGY_ARITY)
def test_strategy_outputs_refined_then_backbone(strategy, arity):
    model = tiny_cris(strategy).eval()
    image, _ = batch()
    with torch.no_grad():
        outputs = model(image)
        coarse = model.backbone(image)[0]
    assert len(outputs) == arity
    assert all(out.shape == (2, 1, SIZE, SIZE) for out in outputs)
    assert torch.equal(outputs[-1], coarse)  # the backbone's map is always last
    if arity == 2:
        assert not torch.allclose(outputs[0], coarse)


@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_every_backbone_is_built_through_the_registry(backbone):
    model = tiny_cris("cris", backbone=backbone)
    registered = build_model(backbone, pretrained="none", **TINY_BACKBONES[backbone])
    assert type(model.backbone) is type(registered)
    assert len(model(batch()[0])) == 2


def test_refinement_applies_dropout_p_after_every_block():
    dropouts = [m for m in tiny_cris("cris", dropout=0.01).head.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 5 and all(d.p == 0.01 for d in dropouts)
    head = RefinementFCN(width=8, dropout=0.5)
    logits = torch.randn(2, 1, 16, 16)
    head.train()
    assert not torch.allclose(head(logits), head(logits))
    head.eval()
    assert torch.equal(head(logits), head(logits))


def test_refinement_fcn_reads_the_probability_map():
    head = RefinementFCN(width=8, dropout=0.0).eval()
    logits = torch.randn(1, 1, 16, 16)
    assert torch.allclose(head(logits), head.out(head.blocks(torch.sigmoid(logits))))


def test_crf_keeps_shape_and_changes_logits():
    crf = MeanFieldCRF(window=5, iterations=3)
    unary = torch.randn(2, 1, 32, 32)
    refined = crf(unary, torch.rand(2, 3, 32, 32))
    assert refined.shape == unary.shape and torch.isfinite(refined).all()
    assert not torch.allclose(refined, unary)


def test_crf_without_pairwise_weights_is_the_identity():
    crf = MeanFieldCRF(window=3, iterations=2)
    with torch.no_grad():
        crf.kernel_weights.zero_()
    unary = torch.randn(1, 1, 16, 16)
    assert torch.allclose(crf(unary, torch.rand(1, 3, 16, 16)), unary)


def test_crf_suppresses_an_isolated_pixel_and_follows_colour_edges():
    crf = MeanFieldCRF(window=5, iterations=5)
    unary = torch.full((1, 1, 16, 16), -2.0)
    unary[..., 8, 8] = 0.5
    assert crf(unary, torch.zeros(1, 3, 16, 16))[..., 8, 8] < 0  # Potts smoothing flips a lone pixel
    image = torch.zeros(1, 3, 16, 16)
    image[..., :, 8:] = 1.0  # right half a different colour, and confidently foreground
    unary = torch.full((1, 1, 16, 16), -0.5)
    unary[..., :, 8:] = 3.0
    edge = {}
    for name, weights in [("spatial", [3.0, 0.0]), ("appearance", [0.0, 3.0])]:
        with torch.no_grad():
            crf.kernel_weights.copy_(torch.tensor(weights))
        edge[name] = crf(unary, image)[..., :, 7:9].detach()
    assert edge["appearance"][..., 0].max() < edge["spatial"][..., 0].min() - 1  # colour edge blocks leakage
    assert edge["appearance"][..., 0].max() < 0 < edge["appearance"][..., 1].min()


def test_crf_parameters_receive_gradients():
    crf = MeanFieldCRF(window=3, iterations=2)
    crf(torch.randn(1, 1, 16, 16), torch.rand(1, 3, 16, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crf.parameters())


def test_interleaved_loss_schedule_routes_gradients():
    assert [cris_active_loss(e) for e in range(4)] == ["L1", "L2", "L1", "L2"]
    model = tiny_cris("cris").train()
    image, mask = batch()
    loss_fn = SegLoss("cris_interleaved")
    for epoch, head_learns in [(0, False), (1, True), (2, False), (3, True)]:
        model.zero_grad(set_to_none=True)
        outputs = model(image)
        loss = loss_fn(outputs, mask, epoch=epoch)
        expected = bce(outputs[0], mask) if head_learns else mse_prob(outputs[1], mask)
        assert torch.equal(loss, expected)
        loss.backward()
        assert (grad_norm(model.head) > 0) is head_learns, epoch
        assert grad_norm(model.backbone) > 0  # L2 also reaches the backbone through the refined map


def test_backbone_fcn_final_loss_trains_both_parts():
    model = tiny_cris("backbone_fcn").train()
    image, mask = batch()
    SegLoss("bce", [1.0, 0.0])(model(image), mask).backward()
    assert grad_norm(model.head) > 0 and grad_norm(model.backbone) > 0


def test_threshold_is_a_saved_buffer():
    model = tiny_cris("backbone")
    assert float(model.threshold) == 0.5 and "threshold" in model.state_dict()
    model.threshold.fill_(0.37)
    other = tiny_cris("backbone")
    other.load_state_dict(model.state_dict())
    assert float(other.threshold) == pytest.approx(0.37)


def test_builder_rejects_bad_configuration():
    with pytest.raises(ValueError, match="strategy"):
        tiny_cris("weighted_sum")
    with pytest.raises(ValueError, match="backbone"):
        build_model("cris", backbone="fcn", pretrained="none")
    with pytest.raises(ValueError, match="pretrained"):
        build_model("cris", backbone="segnet", backbone_kwargs={"pretrained": "none"})
    with pytest.raises(ValueError, match="only pretrained='none'"):
        build_model("segnet", pretrained="offline")


def test_segnet_unpooling_exports_with_matching_output(tmp_path):
    """Rectangular input, several channels and a dynamic batch: ONNX MaxPool's indices are flattened
    over N·C·H·W, PyTorch's per plane, so a wrong conversion would show here."""
    torch.manual_seed(0)
    model = build_model("segnet", pretrained="none", base_channels=4, depth=2).eval()
    example = torch.rand(2, 3, 32, 96)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=18, input_names=["image"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}, verbose=False,
    )
    program.save(str(tmp_path / "segnet.onnx"))
    image = torch.rand(3, 3, 32, 96)
    with torch.no_grad():
        expected = model(image)[0].numpy()
    got = onnx_session(tmp_path / "segnet.onnx").run(None, {"image": image.numpy()})[0]
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-4


def test_crf_strategy_exports_to_onnx(tmp_path):
    model = tiny_cris("backbone_crf").eval()
    graph = DeployGraph(model, probability, *NORMALIZATION["imagenet"])
    path = export_onnx(graph, tmp_path / "cris_crf.onnx", SIZE, 18, ("probability",))
    assert parity(graph, path, image_size=SIZE) < 1e-4
