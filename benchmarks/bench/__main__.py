"""``python -m benchmarks.bench``: see :mod:`benchmarks.bench.cli`."""

from benchmarks.bench.cli import run

run()
