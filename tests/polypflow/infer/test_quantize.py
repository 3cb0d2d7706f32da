"""int8 ONNX (polypflow.infer.onnx.quantize_int8): a QDQ graph whose masks track the fp32 graph's on polyp-like frames,
with the modules it is told to keep in float32 left unquantised."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch

from polypflow.data.images import NORMALIZATION, to_tensor
from polypflow.infer.onnx import DeployGraph, export_onnx, onnx_session, probability, quantize_int8
from polypflow.evaluate.seg_metrics import dice_batch
from tests.conftest import conv_weights, float_weights, make_pair

pytestmark = pytest.mark.quick
SIZE = 64


def frames(first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic polyp frames (uint8 N×S×S×3) and their masks."""
    pairs = [make_pair(first + i, SIZE) for i in range(n)]
    return np.stack([np.asarray(p[0]) for p in pairs]), np.stack([np.asarray(p[1]) > 0 for p in pairs])


class TinySegmenter(torch.nn.Module):
    """Three convolutions to one logit map, returned as the registry's models return theirs (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.body(x),)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A tiny segmenter fitted to the synthetic polyps (a map worth quantising), exported as the pipeline exports."""
    torch.manual_seed(0)
    model, (images, masks) = TinySegmenter(), frames(0, 16)
    x, y = to_tensor(images, "imagenet"), torch.from_numpy(masks).float()[:, None]
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x)[0], y).backward()
        optimiser.step()
    graph = DeployGraph(model.eval(), probability, *NORMALIZATION["imagenet"])
    return export_onnx(graph, tmp_path_factory.mktemp("int8") / "fp32.onnx", SIZE, 18, ("probability",))


def test_int8_graph_is_qdq_and_tracks_fp32_on_polyp_frames(fp32, tmp_path):
    calibration, _ = frames(100, 8)
    batches = (image.transpose(2, 0, 1)[None].astype(np.float32) / 255 for image in calibration)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", batches)
    graph = onnx.load(str(int8)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)  # int8 weights
    assert list(tmp_path.iterdir()) == [int8]  # the prepared graph and calibration scratch are gone

    images, masks = frames(200, 12)  # frames neither graph saw
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    full, low = (onnx_session(f).run(None, {"image": x})[0][:, 0] for f in (fp32, int8))
    assert dice_batch(full, masks).mean() > 0.6  # the fitted map finds the polyps ...
    assert np.abs(low - full).mean() < 0.02      # ... and the int8 map stays close to it
    assert dice_batch(low, full >= 0.5).mean() > 0.95


def test_the_quantisers_line_per_tensor_is_dropped_while_it_quantises_and_only_then(tmp_path, caplog):
    conv = torch.nn.Conv2d(3, 4, 1)
    with torch.no_grad():  # a bias the weights' int8 scale cannot carry: onnxruntime widens the scale, with a
        conv.weight.fill_(1e-6)  # logging.info per channel on the root logger (1386 lines for Lite1's two graphs)
        conv.bias.fill_(1e3)
    graph = DeployGraph(torch.nn.Sequential(conv), lambda model, out, image: out, *NORMALIZATION["imagenet"])
    fp32 = export_onnx(graph, tmp_path / "fp32.onnx", SIZE, 18, ("out",))
    batches = (image.transpose(2, 0, 1)[None].astype(np.float32) / 255 for image in frames(100, 2)[0])
    caplog.clear()  # the exporter's own lines
    with caplog.at_level(logging.INFO):
        logging.getLogger("polypflow.test").info("a named logger")
        quantize_int8(fp32, tmp_path / "int8.onnx", batches)
        logging.info("after quantising")
    assert [r.getMessage() for r in caplog.records] == ["a named logger", "after quantising"]


def test_modules_kept_in_float32_stay_unquantised_and_the_rest_is_int8(fp32, tmp_path):
    def calibration():
        return (image.transpose(2, 0, 1)[None].astype(np.float32) / 255 for image in frames(100, 4)[0])

    full = conv_weights(quantize_int8(fp32, tmp_path / "all.onnx", calibration()))
    assert len(full) == 3 and all(full.values())  # by default every convolution is int8
    mixed = quantize_int8(fp32, tmp_path / "mixed.onnx", calibration(), float_modules=["body.3"])
    weights, kept = conv_weights(mixed), float_weights(mixed)
    assert len(kept) == 1 and "body.3." in kept[0]  # the dilated convolution's weight is float32 ...
    assert sum(weights.values()) == 2               # ... the other two are still int8
    x = frames(200, 4)[0].transpose(0, 3, 1, 2).astype(np.float32) / 255
    low, full_map = (onnx_session(graph).run(None, {"image": x})[0] for graph in (mixed, fp32))
    assert np.abs(low - full_map).max() < 0.2  # a working graph, close to fp32


def test_a_module_no_node_takes_a_parameter_of_is_an_error_naming_the_graph(fp32, tmp_path):
    batches = (image.transpose(2, 0, 1)[None].astype(np.float32) / 255 for image in frames(100, 2)[0])
    with pytest.raises(ValueError, match=r"fp32\.onnx: no node takes a parameter of \['body\.9'\]"):
        quantize_int8(fp32, tmp_path / "int8.onnx", batches, float_modules=["body.0", "body.9"])
    assert not (tmp_path / "int8.onnx").exists()


class GroupNormSegmenter(TinySegmenter):
    """A convolution, a GroupNorm (a detector head's norm), one logit map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 1, 1))


def test_a_groupnorms_scale_and_bias_stay_float32_without_the_quantisers_warning(tmp_path, caplog):
    """GroupNorm, exported as InstanceNormalization over reshaped groups: its scale and bias stay float32
    initialisers, the quantiser says nothing about their channel axis, and the convolutions are int8."""
    torch.manual_seed(0)
    graph = DeployGraph(GroupNormSegmenter().eval(), probability, *NORMALIZATION["imagenet"])
    fp32 = export_onnx(graph, tmp_path / "fp32.onnx", SIZE, 18, ("probability",))
    calibration, _ = frames(100, 4)
    batches = (image.transpose(2, 0, 1)[None].astype(np.float32) / 255 for image in calibration)
    with caplog.at_level(logging.WARNING):
        int8 = quantize_int8(fp32, tmp_path / "int8.onnx", batches)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    nodes = onnx.load(str(int8)).graph.node
    produced = {out for node in nodes for out in node.output}
    norms = [node for node in nodes if node.op_type == "InstanceNormalization"]
    assert norms and not [name for node in norms for name in node.input[1:] if name in produced]
    weights = conv_weights(int8)
    assert len(weights) == 2 and all(weights.values())
