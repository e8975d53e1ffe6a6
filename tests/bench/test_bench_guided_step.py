"""Benchmarks of ``guided_step``: every available variant, the sampler's shapes (one step
of B sequences of L = 32 tokens, d = 576, a critic of H = 128 hidden units)."""

from __future__ import annotations

import torch

from fastdia import ops
from fastdia.profile import Case, make_op_call

OP = ops.GUIDED_STEP
CASES = {
    "cpu": [Case(OP, n, 576, hidden=128, seq_len=32) for n in (64, 256)],
    "cuda": [Case(OP, n, 576, hidden=128, seq_len=32) for n in (256, 1024, 8192)],
}


def test_guided_step(benchmark, device, variant, case):
    call = make_op_call(case, device)(variant)
    out, h = benchmark(call, 0)
    assert out.shape == (case.tokens, case.dim) and out.dtype == torch.float32
    assert h is None and torch.isfinite(out).all()
    if variant != "reference":  # the same step as the reference, to tf32's rounding
        ref, _ = make_op_call(case, device)("reference")(0)
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
