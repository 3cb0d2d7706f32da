"""Flip test-time augmentation as part of the network (``models.tta``): the mean of the flipped views in eval
mode, the plain network in training, a builder argument every segmenter takes, saved and rebuilt with the model and
exported into its ONNX graph, so evaluation, export and serving all see the same maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model, check_kwargs, method_entry
from models.tta import FlipTTA, in_view, plain, temperature, with_temperature
from polypflow.data.images import NORMALIZATION
from polypflow.infer.device import CPU
from polypflow.infer.onnx import onnx_session
from polypflow.tasks.segmentation import SegmentationTask, predict_probs
from polypflow.train.checkpoint import load_trained, save_trained

SIZE = 64
MEAN, STD = NORMALIZATION["imagenet"]


def tiny_unet(tta: str = "none") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", tta=tta, **{**method_entry("unet").test_kwargs, "pretrained": "none"})


@pytest.mark.quick
@pytest.mark.parametrize("tta, views", [("hflip", [(), (3,)]), ("hvflip", [(), (3,), (2,)])])
def test_eval_maps_are_the_mean_of_the_flipped_views_and_training_is_the_plain_network(tta, views):
    model = tiny_unet(tta)
    assert isinstance(model, FlipTTA)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model.eval()
        got = model(x)
        views_out = [[o.flip(d) if d else o for o in model.net(x.flip(d) if d else x)] for d in views]
        by_hand = [torch.stack([v[i] for v in views_out]).mean(0) for i in range(len(got))]
        for g, h in zip(got, by_hand, strict=True):
            torch.testing.assert_close(g, h)
        assert not torch.allclose(got[0], model.net(x)[0])  # the views differ: a real average
        model.train()
        for g, h in zip(model(x), model.net(x), strict=True):
            torch.testing.assert_close(g, h)


@pytest.mark.quick
def test_a_view_is_the_network_on_the_flipped_input_with_every_map_flipped_back():
    net = tiny_unet().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for g, h in zip(in_view(net, x, ()), net(x), strict=True):
            torch.testing.assert_close(g, h)
        for dims in ((3,), (2,), (2, 3)):
            got, flipped = in_view(net, x, dims), net(x.flip(dims))
            assert len(got) == len(flipped)
            for g, f in zip(got, flipped, strict=True):
                torch.testing.assert_close(g, f.flip(dims))
            assert not torch.allclose(got[0], net(x)[0])  # the view is not the identity


@pytest.mark.quick
def test_tta_is_a_segmenters_argument_only():
    check_kwargs("unet", {"tta": "hvflip", **method_entry("unet").test_kwargs})
    with pytest.raises(ValueError, match="tta .*segmenters.*gfl_atss.*detection"):
        check_kwargs("gfl_atss", {"tta": "hflip"}, "methods.gfl_atss.model")
    with pytest.raises(ValueError, match="segmenters"):
        build_model("gfl_atss", tta="hflip", **method_entry("gfl_atss").test_kwargs)
    with pytest.raises(ValueError, match="tta must be one of"):
        tiny_unet("rot90")
    assert not isinstance(tiny_unet("none"), FlipTTA)


@pytest.mark.quick
def test_temperature_ships_with_the_model_not_its_weights(tmp_path):
    model = tiny_unet("hvflip").eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {**method_entry("unet").test_kwargs, "tta": "hvflip"}
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    raw = predict_probs(model, images, "imagenet", CPU)
    assert temperature(model) == 1.0
    with_temperature(model, 3.0)
    assert model.state_dict().keys() == weights.keys()  # not a weight: checkpoints look the same at any temperature
    save_trained(tmp_path / "model.pt", model, arch="unet", model_kwargs=kwargs, temperature=3.0)
    loaded, meta = load_trained(tmp_path / "model.pt")
    assert temperature(loaded) == 3.0 == temperature(plain(loaded))  # the plain network keeps the shipped map
    logits = np.log(raw / (1 - raw))
    np.testing.assert_allclose(predict_probs(loaded, images, "imagenet", CPU), 1 / (1 + np.exp(-3 * logits)), atol=1e-5)
    save_trained(tmp_path / "old.pt", tiny_unet("hvflip"), arch="unet", model_kwargs=kwargs)  # saved before temperatures
    assert temperature(load_trained(tmp_path / "old.pt")[0]) == 1.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        with_temperature(model, 0.0)


def test_saved_model_is_rebuilt_with_its_tta_and_exported_with_the_flips_in_the_graph(tmp_path):
    model = tiny_unet("hvflip").eval()
    kwargs = {**method_entry("unet").test_kwargs, "tta": "hvflip"}
    save_trained(tmp_path / "model.pt", model, arch="unet", model_kwargs=kwargs, temperature=2.5)
    loaded, meta = load_trained(tmp_path / "model.pt")
    assert isinstance(loaded, FlipTTA) and meta["model_kwargs"]["tta"] == "hvflip" and temperature(loaded) == 2.5
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    meta = {"image_size": SIZE, "mean": list(MEAN), "std": list(STD)}
    diff, _ = SegmentationTask.export(loaded, meta, tmp_path / "model.onnx", 18)
    assert diff < 1e-4
    rgb = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    got = onnx_session(tmp_path / "model.onnx").run(None, {"image": rgb})[0]
    norm = (torch.from_numpy(rgb) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        with_tta, one_pass = (torch.sigmoid(2.5 * loaded(norm)[0]).numpy(), torch.sigmoid(2.5 * loaded.net(norm)[0]).numpy())
    np.testing.assert_allclose(got, with_tta, atol=1e-4)  # the graph holds the flips and the temperature
    assert np.abs(got - one_pass).max() > 1e-3  # not the plain network
