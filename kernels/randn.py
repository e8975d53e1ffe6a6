"""Triton reference kernels for the fastdia noise convention (see :mod:`fastdia.noise`).

``randn_triton(seed, step, numel)`` writes ``tl.randn((seed << 32) | step, k)`` for
``k = 0 .. numel - 1`` (int32 offsets); ``randint4x_triton`` writes the four Philox words of
``tl.randint4x`` for the same key and offsets. Both exist to pin the PyTorch reference in
:mod:`fastdia.noise` to Triton; fused kernels call ``tl.randn`` with the same key directly.

This is the only place in fastdia that imports triton at module import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdia.errors import ConfigError
from fastdia.noise import MAX_INDEX, triton_key

__all__ = ["randint4x_triton", "randn_triton"]

_BLOCK = 1024


@triton.jit
def _randn_kernel(out_ptr, key, n, BLOCK: tl.constexpr):
    """out[k] = tl.randn(key, k) for k < n; offsets are int32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.randn(key, offs), mask=mask)


@triton.jit
def _randint4x_kernel(out_ptr, key, n, BLOCK: tl.constexpr):
    """out[j, k] = word j of tl.randint4x(key, k) bitcast to int32, for k < n; out is (4, n)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    i1, i2, i3, i4 = tl.randint4x(key, offs)
    tl.store(out_ptr + offs, i1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + n + offs, i2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 2 * n + offs, i3.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 3 * n + offs, i4.to(tl.int32, bitcast=True), mask=mask)


def _check_numel(numel: int) -> None:
    if isinstance(numel, bool) or not isinstance(numel, int) or not 0 <= numel <= MAX_INDEX:
        raise ConfigError(f"numel={numel!r} is out of range: it must be an int in [0, 2**31]")


def randn_triton(seed: int, step: int, numel: int, *, device: torch.device | str) -> torch.Tensor:
    """``tl.randn((seed << 32) | step, k)`` for ``k`` in ``[0, numel)``.

    Returns a 1-D fp32 tensor of shape ``(numel,)`` on ``device``. Raises
    :class:`fastdia.errors.ConfigError` for a seed or step outside ``[0, 2**31)``.
    """
    key = triton_key(seed, step)
    _check_numel(numel)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _randn_kernel[(triton.cdiv(numel, _BLOCK),)](out, key, numel, BLOCK=_BLOCK)
    return out


def randint4x_triton(
    seed: int, step: int, numel: int, *, device: torch.device | str
) -> torch.Tensor:
    """The four words of ``tl.randint4x((seed << 32) | step, k)`` for ``k`` in ``[0, numel)``.

    Returns an int64 tensor of shape ``(4, numel)`` on ``device`` holding uint32 values
    (row ``j`` is word ``j``).
    """
    key = triton_key(seed, step)
    _check_numel(numel)
    out = torch.empty((4, numel), dtype=torch.int32, device=device)
    if numel:
        _randint4x_kernel[(triton.cdiv(numel, _BLOCK),)](out, key, numel, BLOCK=_BLOCK)
    return out.to(torch.int64) & 0xFFFFFFFF
