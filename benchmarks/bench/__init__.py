"""Speed side by side on the device present (``python -m benchmarks.bench``; conventions: benchmarks/README.md).

One module a section: ``common`` (the run's Setup, failures as data), ``device`` (device facts, GEMM probe),
``methods`` (the settings that build and train a registered architecture), ``inference`` (PyTorch and ONNX
Runtime back-ends), ``throughput`` (training through the trainer's step), ``loading`` (data pipelines),
``paper`` (paper-profile timing from ``profiles/paper.yaml``), ``targets`` and ``report`` (bench.json,
bench.md), ``cli`` (the command line).
"""

from benchmarks.bench.cli import run

__all__ = ["run"]
