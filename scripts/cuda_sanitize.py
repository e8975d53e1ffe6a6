"""A small driver of both CUDA kernels for compute-sanitizer (run by scripts/gpu-check.sh).

Calls every path of the ``cuda`` variants once on small, awkward shapes (N = 1, d = 577 and
d = 1 for the unaligned element-by-element loads, d = 64 for the 16-byte ones, V not a
multiple of the tile, a single vocabulary entry, several splits, fp32/fp16/bf16, the
elementwise, row-tile and per-sequence guided_step kernels, with and without column groups)
and checks the results against the references, so that memcheck, racecheck and synccheck
see every kernel and every branch. Exits non-zero when a result disagrees. Run it under the
sanitizer with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own
allocation::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python scripts/cuda_sanitize.py
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger("cuda_sanitize")

DEV = "cuda"


def _guided_step_cases() -> int:
    from fastdia.ops import TokenLocalStack, cuda_ops
    from fastdia.ops.guided_step_ref import guided_step_reference

    failures = 0
    gen = torch.Generator().manual_seed(0)
    for batch, length, dim, hidden in ((1, 1, 577, 16), (2, 3, 64, 130), (3, 70, 1, 5)):
        n = batch * length
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            z, eps, grad = (torch.randn(n, dim, generator=gen).to(dtype).to(DEV) for _ in range(3))
            stack = TokenLocalStack(
                (torch.randn(hidden, dim, generator=gen) / dim**0.5).to(DEV),
                torch.randn(hidden, generator=gen).to(DEV),
                (torch.randn(hidden, generator=gen) / hidden**0.5).to(DEV),
                torch.randn((), generator=gen).to(DEV),
            )
            coef = (torch.rand(batch, 4, generator=gen) + 0.1).to(DEV)
            for critic, kappa, return_h, g, groups in (
                (None, 0.0, False, None, None),
                (None, 0.0, False, grad, None),
                (stack, 0.0, False, grad, None),
                (stack, 0.0, False, grad, 3),
                (stack, 0.5, True, grad, None),
                (stack, 0.5, True, grad, 2),
                (stack, 0.0, True, None, None),
            ):
                kw = {
                    "seq_len": length,
                    "seed": 7,
                    "step": 3,
                    "guidance": 1.5,
                    "critic": critic,
                    "grad": g,
                    "noise_kappa": kappa,
                    "return_h": return_h,
                }
                out, h = cuda_ops.guided_step(z, eps, coef, d_groups=groups, **kw)
                ref, ref_h = guided_step_reference(z, eps, coef, **kw)
                ok = torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
                if h is not None:
                    ok = ok and torch.allclose(h, ref_h, rtol=1e-4, atol=1e-4)
                if not ok:
                    failures += 1
                    log.error("guided_step mismatch: %s %s %s", (batch, length, dim), dtype, kw)
    return failures


def _round_to_vocab_cases() -> int:
    from fastdia.ops import cuda_ops
    from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference

    failures = 0
    gen = torch.Generator().manual_seed(1)
    for n, v, d in ((1, 300, 577), (130, 1, 64), (37, 1000, 1), (5, 4099, 64)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            z = torch.randn(n, d, generator=gen).to(dtype).to(DEV)
            weight = torch.randn(v, d, generator=gen).to(dtype).to(DEV)
            bias = torch.randn(v, generator=gen).to(DEV)
            z[0] = weight[v // 2] * 4  # a clear winner when d is large
            for splits in (None, 1, 3):
                ids, emb = cuda_ops.round_to_vocab(
                    z, weight, bias, return_embeddings=True, num_splits=splits
                )
                plain = cuda_ops.round_to_vocab(z, weight, bias, num_splits=splits)
                ref = round_to_vocab_reference(z, weight, bias)
                if not (
                    torch.equal(ids, plain)
                    and torch.equal(emb, weight[ids])
                    and (d < 64 or int(ids[0]) == int(ref[0]))
                    and bool(((ids >= 0) & (ids < v)).all())
                ):
                    failures += 1
                    log.error("round_to_vocab mismatch: %s %s splits=%s", (n, v, d), dtype, splits)
    return failures


def main() -> int:
    """Run every case; the exit status is the number of disagreeing results (capped)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device is visible")
        return 2
    failures = _guided_step_cases() + _round_to_vocab_cases()
    torch.cuda.synchronize()
    log.info("cuda_sanitize: %d disagreeing results", failures)
    return min(failures, 1)


if __name__ == "__main__":
    sys.exit(main())
