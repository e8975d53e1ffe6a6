"""Benchmarks of ``round_to_vocab``: every available variant, SmolLM2's vocabulary
(d = 576, V = 49152) with float32 operands (the sampler's) and the L2 rounding bias."""

from __future__ import annotations

import torch

from fastdia import ops
from fastdia.profile import Case, make_op_call

OP = ops.ROUND_TO_VOCAB
CASES = {
    "cpu": [Case(OP, n, 576, vocab=49152) for n in (16, 64)],
    "cuda": [Case(OP, n, 576, vocab=49152) for n in (64, 1024, 4096, 8192)],
}


def test_round_to_vocab(benchmark, device, variant, case):
    call = make_op_call(case, device)(variant)
    ids = benchmark(call, 0)
    assert ids.shape == (case.tokens,) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < case.vocab)).all()
    if variant != "reference":  # random rows: no near ties at this size, same argmax
        ref = make_op_call(case, device)("reference")(0)
        assert (ids != ref).float().mean() < 0.01
