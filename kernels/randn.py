"""Triton reference kernels for the fastdia noise convention (see :mod:`fastdia.noise`).

The convention: the Gaussian of element ``k`` is lane ``k % 4`` of
``tl.randn4x(key, k // 4)``, ``key = (seed << 32) | step`` (one Philox draw serves four
consecutive elements). Fused kernels draw their noise with the two helpers here:
:func:`randn_groups` (a tile whose columns come in whole groups of four: one draw per four
elements) and :func:`randn_lanes` (any element indices, one draw per element).

``randn_triton(seed, step, numel)`` writes the Gaussians of ``k = 0 .. numel - 1`` (int32
offsets); ``randint4x_triton`` writes the four Philox words of ``tl.randint4x`` for counters
``0 .. numel - 1``. Both exist to pin the PyTorch reference in :mod:`fastdia.noise` to Triton.

This is the only place in fastdia that imports triton at module import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdia.errors import ConfigError
from fastdia.noise import MAX_INDEX, triton_key

__all__ = ["randint4x_triton", "randn_groups", "randn_lanes", "randn_triton"]

_BLOCK = 1024


@triton.jit
def randn_groups(key, groups):
    """The Gaussians of whole groups: ``groups`` is an int32 block of group counters
    (``k // 4``) of shape ``[..., K]``; returns fp32 ``[..., 4 K]`` whose element
    ``4 j + l`` of the last dim is lane ``l`` of ``tl.randn4x(key, groups[..., j])``."""
    n1, n2, n3, n4 = tl.randn4x(key, groups)
    return tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))


@triton.jit
def randn_lanes(key, offs):
    """The Gaussian of each element index in ``offs`` (an int32 block of any shape): lane
    ``offs % 4`` of ``tl.randn4x(key, offs // 4)``. One Philox draw per element: use
    :func:`randn_groups` where a tile holds whole groups."""
    n1, n2, n3, n4 = tl.randn4x(key, offs // 4)
    lane = offs % 4
    return tl.where(lane < 2, tl.where(lane == 0, n1, n2), tl.where(lane == 2, n3, n4))


@triton.jit
def _randn_kernel(out_ptr, key, n, BLOCK: tl.constexpr):
    """out[k] = the fastdia Gaussian of element k, for k < n; offsets are int32."""
    groups = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, randn_groups(key, groups), mask=offs < n)


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
    """The fastdia Gaussians of elements ``k`` in ``[0, numel)`` (see the module docstring).

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
