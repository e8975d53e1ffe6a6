"""The device checks of ``benchmarks/gpu_kernels.py`` as tests (skipped without a GPU).

The compiled Triton kernels against the PyTorch references on the GPU: every dtype,
awkward shapes, poisoned outputs, per-sample coefficients, adaptive noise, ``h``, seed,
step and guidance as device tensors, a CUDA-graph replay with the step read from the
device, rounding ties across tiles and vocabulary splits. The benchmark runs the same
functions before it times anything; here each one is a test. Run with
``TRITON_INTERPRET=0`` (``tests/conftest.py`` turns the interpreter on otherwise).
"""

from __future__ import annotations

import pytest

from fastdia.device import triton_interpreting

pytestmark = pytest.mark.cuda

gpu_kernels = pytest.importorskip("benchmarks.gpu_kernels")


@pytest.mark.parametrize("check", ["check_guided_step", "check_round_to_vocab"])
def test_kernel_device_checks(check):
    if triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 for compiled kernels")
    records = getattr(gpu_kernels, check)()
    assert records
    failed = [record for record in records if not record["ok"]]
    assert not failed, failed
