"""Benchmarks: our fast paths against the tools they replace, side by side (``python -m bench.run``)."""
