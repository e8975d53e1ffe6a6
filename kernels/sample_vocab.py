"""Fused Triton ``sample_vocab``: a Gumbel-max draw over the vocabulary per row.

Same call signature and semantics as :func:`fastdia.ops.gumbel.sample_vocab_reference`::

    id[n] = argmax_v <E_v, z[n]> + bias_v + g(seed_n, step, v)   (bias [V])
                         ... + bias_{n,v} ...                   (bias [N, V])

with ``g = -log(-log(clamp(tl.rand(key_n, v), GUMBEL_U_MIN, GUMBEL_U_MAX)))`` and
``key_n = (seed_n << 32) | step``, row ``n``'s own seed (fastdia's Philox numbering,
:func:`fastdia.noise.gumbel_rows`).

Design: program ``(m, s)`` owns ``BLOCK_M`` rows and the vocabulary slice ``s`` of ``S``;
it walks the slice in ``BLOCK_V`` tiles, each a ``[BLOCK_M, BLOCK_V]`` score block from
``tl.dot`` over ``d`` in ``BLOCK_K`` chunks (float32 accumulation), adds the bias and the
Gumbel noise drawn in registers, and keeps a running ``(max, argmax)`` (strict ``>``: ties
to the lowest id). The partial maxima ``[S, N]`` are merged by ``torch.max`` over the
slices (the first slice wins ties). The ``[N, V]`` scores never reach memory. The decode
calls it with ``N = B`` (a few rows), where reading ``E`` once dominates, so ``S`` spreads
the vocabulary over about two programs per SM. The per-row seeds ``[N]`` and the step are
read from device tensors (graph-safe). float32 operands use ``tf32x3`` products by default
(fp32-level accuracy; ``"ieee"`` for exact FMAs); under ``TRITON_INTERPRET=1`` one large
tile is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdia import noise
from fastdia.device import sm_count, triton_interpreting
from fastdia.errors import ConfigError
from fastdia.ops.checks import (
    DOT_PRECISIONS,
    FLOAT_DTYPES,
    check_precision,
    device_scalar,
)
from fastdia.ops.gumbel import check_bias

__all__ = ["sample_vocab"]

U_MIN = noise.GUMBEL_U_MIN
U_MAX = noise.GUMBEL_U_MAX


@triton.jit
def _sample_kernel(
    z_ptr,
    w_ptr,
    b_ptr,
    seed_ptr,
    step_ptr,
    val_ptr,
    idx_ptr,
    n,
    v,
    d,
    HAS_BIAS: tl.constexpr,
    ROW_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    per_split = tl.cdiv(tl.cdiv(v, splits), BLOCK_V) * BLOCK_V
    v_start = pid_s * per_split
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    row_seed = tl.load(seed_ptr + rows, mask=row_ok, other=0).to(tl.uint64)
    key = ((row_seed << 32) | tl.load(step_ptr).to(tl.uint64))[:, None]
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK_M,), tl.int32)
    for v0 in range(v_start, v_start + per_split, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d
            zt = tl.load(
                z_ptr + rows[:, None] * d + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + cols[None, :] * d + ks[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                zt = zt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(zt, wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            if ROW_BIAS:
                acc += tl.load(
                    b_ptr + rows[:, None] * v + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
            else:
                acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        u = tl.rand(key, (cols[None, :] + rows[:, None] * 0).to(tl.int32))
        u = tl.minimum(tl.maximum(u, U_MIN), U_MAX)
        score = acc - tl.log(-tl.log(u))
        score = tl.where(row_ok[:, None] & col_ok[None, :], score, float("-inf"))
        tile_max, tile_arg = tl.max(
            score, axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_id = tl.where(better, v0 + tile_arg, best_id)
    tl.store(val_ptr + pid_s * n + rows, best, mask=row_ok)
    tl.store(idx_ptr + pid_s * n + rows, best_id, mask=row_ok)


def sample_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    precision: str = "tf32x3",
) -> torch.Tensor:
    """One token per row of ``z [N, d]`` from ``softmax(z weight^T + bias)``: ``[N]`` int64.

    ``weight [V, d]``; ``z``/``weight`` float32, float16 or bfloat16; ``bias [V]``,
    ``[N, V]`` (one row per query) or None; ``seed``: per-row seeds ``[N]`` int64 on
    ``z``'s device, or one seed ``s`` (row ``n`` takes ``s + n``); ``step``: an int or a
    0-d integer tensor (read on the device).
    """
    check_precision(precision, DOT_PRECISIONS)
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"sample_vocab takes z [N, d] and weight [V, d], got {tuple(z.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if z.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"sample_vocab takes float32/16 operands, got {z.dtype}, {weight.dtype}")
    n, d = z.shape
    vocab = weight.shape[0]
    if vocab >= noise.MAX_INDEX:
        raise ConfigError(f"sample_vocab numbers its noise by v < 2**31: V = {vocab} is too large")
    check_bias(bias, n, vocab)
    device = z.device
    z, weight = z.contiguous(), weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    interp = triton_interpreting()
    upcast = interp or z.dtype != weight.dtype
    if interp:
        meta = {"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_K": 64}
        splits = 1
    else:
        meta = {"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
        row_tiles = triton.cdiv(n, meta["BLOCK_M"])
        max_splits = triton.cdiv(vocab, meta["BLOCK_V"])
        splits = max(1, min(max_splits, 2 * sm_count(device) // row_tiles))
    vals = torch.empty(splits, n, dtype=torch.float32, device=device)
    idx = torch.empty(splits, n, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, meta["BLOCK_M"]), splits)
    _sample_kernel[grid](
        z,
        weight,
        bias if bias is not None else z,
        noise.row_seeds(seed, n, device),
        device_scalar(step, torch.int64, device, "step"),
        vals,
        idx,
        n,
        vocab,
        d,
        HAS_BIAS=bias is not None,
        ROW_BIAS=bias is not None and bias.dim() == 2,
        UPCAST=upcast,
        PRECISION=precision,
        **meta,
    )
    if splits == 1:
        return idx[0].to(torch.int64)
    first = vals.argmax(dim=0)  # torch.argmax returns the first maximum: lowest slice
    return idx.gather(0, first[None, :])[0].to(torch.int64)
