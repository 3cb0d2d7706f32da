"""ONNX export (dynamo exporter, opset from ``export.opset``, dynamic batch) of any registered model, checked
against PyTorch.

One deployable graph, :class:`DeployGraph`: an RGB batch in [0, 1] in (the normalisation is inside the graph,
so a user feeds plain pixels), the model, then what the task's head makes of its outputs: a segmenter's main-map
probability (:func:`probability`), or a detector's decoded box and score for every anchor, before any threshold
or NMS (:func:`anchor_boxes`: fixed shapes, nothing data-dependent in the graph). A detector's NMS runs after the
graph in :func:`models.gfl_atss.postprocess`, the function PyTorch predictions go through too, so its parity is
compared after the same post-processing. (ONNX's ``NonMaxSuppression`` exists, but per-image variable-length
outputs with a dynamic batch would need a padded or flattened-index output every consumer re-parses.)

:func:`quantize_int8` makes the int8 graph of an exported one: onnxruntime's own static quantiser, QDQ format,
per-channel int8 weights, uint8 activations, calibrated (min/max) on the batches it is given (the pipeline's: the
method's training images, ``polypflow.tasks.plan.calibration_batches``), the modules it is told to keep in float32
left unquantised (mixed precision: :func:`float_nodes`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from models.gfl_atss import Detections, postprocess
from models.tta import scaled
from polypflow.infer.predictor import Decoding
from polypflow.io import atomic_path

Head = Callable[[nn.Module, object, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def probability(model: nn.Module, outputs: tuple[torch.Tensor, ...], image: torch.Tensor) -> torch.Tensor:
    """A segmenter's head: the main map's probability at the model's temperature, N×1×S×S."""
    return torch.sigmoid(scaled(model, outputs[0]))


def anchor_boxes(model: nn.Module, outputs: object, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A detector's head: every anchor's decoded box (N×A×4, x1 y1 x2 y2 pixels, clipped) and score (N×A)."""
    return model.boxes(outputs, (image.shape[-2], image.shape[-1]))


class DeployGraph(nn.Module):
    """The deployable graph: RGB batch in [0, 1] -> normalised -> ``model`` -> ``head``."""

    def __init__(self, model: nn.Module, head: Head, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model, self.head = model, head
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        return self.head(self.model, self.model((image - self.mean) / self.std), image)


def export_onnx(graph: DeployGraph, path: Path | str, image_size: int, opset: int, outputs: Sequence[str]) -> Path:
    """Write ``graph`` as ONNX to ``path`` atomically, input ``image`` with a dynamic batch and a fixed
    ``image_size`` (a detector's anchors are laid out for it), outputs named ``outputs``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path, suffix=".onnx") as tmp:
        program = torch.onnx.export(
            graph.eval(), (torch.rand(2, 3, image_size, image_size),), dynamo=True, opset_version=opset,
            input_names=["image"], output_names=list(outputs), dynamic_shapes={"image": {0: batch}},
            external_data=False, verbose=False,
        )
        program.save(str(tmp))
    return Path(path)


class _Batches(CalibrationDataReader):
    """onnxruntime's calibration reader over an iterable of input batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_int8(src: Path | str, dst: Path | str, batches: Iterable[np.ndarray], weight_bits: int = 8,
                  float_modules: Sequence[str] = ()) -> Path:
    """Write the static int8 quantisation of ONNX graph ``src`` to ``dst`` atomically: shape inference
    (``quant_pre_process``), then ``quantize_static`` in QDQ format, per-channel int8 weights, uint8 activations,
    calibrated by min/max on ``batches`` (float32 N×3×S×S RGB in [0, 1], the graph's input ``image``).
    ``weight_bits``: 8 (the full range) or 7 (onnxruntime's ``reduce_range``), which avoids the saturating
    uint8 × int8 products of x86 CPUs without VNNI (AVX2-only, such as one 2-core AMD EPYC), at a bit of weight
    precision elsewhere. The nodes of ``float_modules`` (:func:`float_nodes`) and the normalisations
    (:func:`float_norms`) stay in float32."""
    if weight_bits not in (7, 8):
        raise ValueError(f"{src}: int8 weights take 7 or 8 bits, got {weight_bits}")
    with (_root_info_muted(), tempfile.TemporaryDirectory(prefix="quantize-") as work,
          atomic_path(dst, suffix=".onnx") as tmp):
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        kept = (float_nodes(graph, float_modules, src) if float_modules else []) + float_norms(graph)
        quantize_static(str(prepared), str(tmp), _Batches(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=weight_bits == 7,
                        nodes_to_exclude=kept)
    return Path(dst)


def float_norms(graph: onnx.GraphProto) -> list[str]:
    """The ``InstanceNormalization`` nodes of ``graph`` (a GroupNorm, as the exporter writes it, such as a detector
    head's), whose scale and bias stay in float32: onnxruntime runs the op in float32 whatever its inputs (no integer
    kernel), and its quantiser warns for each such node that a rank-1 scale has no channel axis 1 before quantising
    it per tensor. (On the default detector: the same box F1 on every test set and the same latency either way.)"""
    return [node.name for node in graph.node if node.op_type == "InstanceNormalization"]


def float_nodes(graph: onnx.GraphProto, modules: Sequence[str], named: Path | str) -> list[str]:
    """The names of the nodes of ``graph`` that take a parameter of one of ``modules``: module paths in the network
    (``encoder.blocks.0``), matched inside any wrapper's path (the exported ``model.encoder.blocks.0.0.conv_dw.weight``,
    or ``model.net.encoder.blocks.0.0.conv_dw.weight`` in a test-time-augmented graph). A module that no node takes a
    parameter of is an error naming the graph ``named``."""
    found = {}
    for module in modules:
        pattern = re.compile(rf"(^|\.){re.escape(module)}\.")
        found[module] = [node.name for node in graph.node if any(pattern.search(name) for name in node.input)]
    missing = [module for module, nodes in found.items() if not nodes]
    if missing:
        raise ValueError(f"{named}: no node takes a parameter of {missing} (int8_float_modules: module paths in the "
                         "network, such as encoder.blocks.0)")
    return sorted({node for nodes in found.values() for node in nodes})


@contextlib.contextmanager
def _root_info_muted() -> Iterator[None]:
    """Drop the records made on the root logger below WARNING: onnxruntime's quantiser reports each bias it copies
    and each weight channel whose scale it widens with ``logging.info`` on it (1386 lines for IC-PolypSeg-Lite1's
    two graphs in export@'s log). A logger's filters see only the records made on it, so every named logger's
    records, the pipeline's and onnxruntime's own, still pass."""
    root, warnings_up = logging.getLogger(), lambda record: record.levelno >= logging.WARNING
    root.addFilter(warnings_up)
    try:
        yield
    finally:
        root.removeFilter(warnings_up)


def onnx_session(path: Path | str, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_batch(image_size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """The seeded random RGB batch in [0, 1] parity is checked on."""
    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def parity(graph: DeployGraph, path: Path | str, image_size: int) -> float:
    """Max absolute difference between a segmenter's graph in PyTorch and in ONNX Runtime on random input."""
    image = random_batch(image_size)
    with torch.no_grad():
        expected = graph.eval()(image).numpy()
    got = onnx_session(path).run(None, {"image": image.numpy()})[0]
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def detector_parity(graph: DeployGraph, path: Path | str, image_size: int, decoding: Decoding) -> dict[str, float]:
    """A detector's graph in PyTorch against ONNX Runtime on random input: the largest difference of the raw boxes
    and scores, and after the same post-processing of both, whether the detections agree (count, boxes, scores)."""
    image = random_batch(image_size)
    with torch.no_grad():
        boxes, scores = graph.eval()(image)
    got_boxes, got_scores = (torch.from_numpy(a) for a in onnx_session(path).run(None, {"image": image.numpy()}))
    post = lambda b, s: postprocess(b, s, decoding.score_threshold, decoding.nms_iou, decoding.max_detections)  # noqa: E731
    expected = [post(b, s) for b, s in zip(boxes, scores)]
    got = [post(b, s) for b, s in zip(got_boxes, got_scores)]
    same_count = all(len(e.boxes) == len(g.boxes) for e, g in zip(expected, got))
    return {
        "raw_boxes_max_abs": float((boxes - got_boxes).abs().max()),
        "raw_scores_max_abs": float((scores - got_scores).abs().max()),
        "detections": sum(len(e.boxes) for e in expected),
        "same_count": same_count,
        "boxes_max_abs": _max_abs(expected, got, "boxes") if same_count else float("inf"),
        "scores_max_abs": _max_abs(expected, got, "scores") if same_count else float("inf"),
    }


def _max_abs(expected: list[Detections], got: list[Detections], field: str) -> float:
    diffs = [(getattr(e, field) - getattr(g, field)).abs().max().item() for e, g in zip(expected, got) if len(e.boxes)]
    return float(np.max(diffs)) if diffs else 0.0
