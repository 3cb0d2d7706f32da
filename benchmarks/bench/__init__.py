"""Speed side by side on the device present (``python -m benchmarks.bench``; conventions: benchmarks/README.md).

One module a section: ``common`` (the run's Setup, failures as data), ``device`` (device facts, GEMM probe),
``methods`` (the kwargs a registered method is built with), ``inference`` (PyTorch and ONNX Runtime
back-ends), ``throughput`` (training), ``loading`` (data pipelines), ``paper`` (paper-profile timing),
``report`` (bench.json, bench.md, targets), ``cli`` (the command line).
"""

from benchmarks.bench.cli import run

__all__ = ["run"]
