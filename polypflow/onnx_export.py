"""ONNX export (dynamo exporter, dynamic batch) of any registered method, checked against PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polypflow.io import atomic_path


class ProbabilityHead(nn.Module):
    """The deployable graph: RGB batch in [0, 1] in, main-map probability (sigmoid) out.

    With ``mean``/``std`` the input normalisation is part of the graph, so a user feeds plain pixels.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((image - self.mean) / self.std)[0])


def export_onnx(model: nn.Module, path: Path | str, image_size: int, opset: int = 18,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically, with a dynamic batch dimension."""
    head = ProbabilityHead(model, mean, std).eval()
    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path, suffix=".onnx") as tmp:
        program = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["probability"],
            dynamic_shapes={"image": {0: batch}},
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp))
    return Path(path)


def onnx_session(path: Path | str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(model: nn.Module, path: Path | str, image_size: int, batch: int = 3, seed: int = 0,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> float:
    """Max absolute difference between PyTorch and ONNX Runtime probabilities on random input."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = ProbabilityHead(model, mean, std).eval()(image).numpy()
    got = onnx_session(path).run(None, {"image": image.numpy()})[0]
    if got.shape != expected.shape:
        raise ValueError(f"{path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())
