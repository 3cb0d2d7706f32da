"""Speed benchmarks run side by side on the device present (``python -m benchmarks.bench``)."""
