"""Benchmark scripts (run from the repository root): ``python -m benchmarks.tokens_per_sec``,
``python benchmarks/gpu_kernels.py``, ...; results with machine and git sha in ``results/``."""
