"""Fused Triton ``round_to_vocab``: ``argmax_v <E_v, z> + bias_v`` without writing the scores.

Same call signature and semantics as
:func:`fastdia.ops.round_to_vocab_ref.round_to_vocab_reference` (``z [..., d]`` in, int64 ids
``[...]`` out, ties to the lowest id, optional ``E[ids]``).

Design
------
* **Main kernel, grid ``(cdiv(N, BLOCK_M), S)``.** Program ``(m, s)`` owns ``BLOCK_M`` rows
  of ``z`` and the vocabulary slice ``[s Vs, (s + 1) Vs)``, ``Vs = cdiv(cdiv(V, S),
  BLOCK_V) BLOCK_V`` (computed in the kernel from the grid's ``S``). It walks the slice in
  ``BLOCK_V`` tiles; each tile is a ``[BLOCK_M, BLOCK_V]`` score block accumulated in
  float32 registers by ``tl.dot`` over ``d`` in ``BLOCK_K`` chunks (the last chunk masked:
  any ``d``), plus the bias; columns past ``V`` are ``-inf``. The (tile, chunk) pairs form
  one flat loop, so the software pipeline (``num_stages``) keeps prefetching across tiles,
  and out-of-range rows and vocabulary entries are clamped for the loads rather than
  masked. A running ``(max, argmax)`` per row is updated from each tile's
  ``tl.max(..., return_indices=True, return_indices_tie_break_left=True)`` with a *strict*
  ``>``, so ties keep the earliest (lowest) id both inside a tile and across tiles. The
  ``[N, V]`` scores never reach memory.
* **Vocabulary split, sized after autotuning.** When ``N`` is small there are too few row
  tiles to fill the GPU, so the vocabulary is split into ``S`` slices, about two programs
  per SM in all. ``S`` depends on the row tile, i.e. on the autotuned ``BLOCK_M``: the grid
  function computes it from each config's ``BLOCK_M`` and ``BLOCK_V`` (so the autotuner
  times every config with its own split), the partial buffers are sized for the largest
  ``S`` of the candidate configs, and the merge reads the ``S`` of the config that ran
  (``Autotuner.best_config``, a host attribute: no sync). Each program writes a partial
  ``(max, argmax)`` to ``[S, N]`` buffers; a tiny merge kernel takes, per row, the first
  split holding the maximum (strict ``>`` over splits in order), so the lowest id wins
  ties exactly as ``torch.argmax``. When every candidate config gives ``S == 1`` and no
  embeddings are asked for, the main kernel writes the ids directly.
* **float32 ``E``: rounding against a bf16 copy, near ties re-scored in fp32**
  (``precision="bf16"``, the default). The sampler's ``E`` is float32; reading it costs
  ``4 V d`` bytes per call and float32 products run at a third of the tensor cores' tf32
  rate (``tf32x3``) or on the FMA units (``ieee``). So the kernel rounds against a bf16 copy
  of ``E`` (made once per weight tensor and cached, keyed by the tensor and its version
  counter: an in-place update of ``E`` makes a new copy) and a bf16 copy of ``z``: half the
  bytes, the bf16 tensor-core rate. The bf16 scores ``s'`` differ from the fp32 scores
  ``s`` by at most ``delta_n = (2u + u^2 + 2 d 2^-24) ||z_n|| max_v ||E_v||`` (``u = 2^-8``,
  each operand's bf16 rounding; Cauchy-Schwarz bounds ``sum_j |z_j E_vj|``; the last term
  covers float32 accumulation), so only the ids with ``s'_v >= max s' - 2 delta_n`` can be
  the fp32 argmax. The kernel keeps the top two ``s'`` per row and an upper bound on the
  number of ids inside that window (counted against the running maximum, restarted when
  the maximum rises by more than the window), then:
  a finishing kernel merges the splits and re-scores the top two exactly in float32
  (``z_n . E_v + bias_v`` from the fp32 rows; ties to the lower id), which is exact
  whenever at most two ids are in the window (the common case: a real ``z`` sits near one
  token). Rows with three or more ids in the window are *flagged* and re-scanned in float32
  (``ieee``) by the same main kernel with a per-row-tile skip (tiles without a flagged row
  run zero iterations; no host sync, so the whole call stays graph-capturable), over a fixed
  ``S`` of up to 32 slices, then merged for the flagged rows only. The result equals the
  fp32 reference's argmax up to float32 rounding of the reference itself. Cost: the cached
  copy (``2 V d`` bytes of device memory), a prep kernel (bf16 ``z`` and the row windows),
  two tiny kernels and a skip-only launch when nothing is flagged.
* **``E[ids]``** (``return_embeddings``) is gathered by the merge kernel on the raw bits of
  ``E`` (an int16/int32 view), so the copy is exact for every dtype.
* **Dtypes.** fp32, fp16 and bf16 operands; the products accumulate in float32. Equal
  16-bit dtypes use the tensor cores natively; float32 ``E`` goes through the bf16 path
  above by default, or plain float32 products with ``precision="tf32x3"`` (fp32-level),
  ``"ieee"`` (exact fp32 FMAs) or ``"tf32"``; other mixed dtypes are upcast to float32 in
  registers. Under ``TRITON_INTERPRET=1`` bf16 loads are upcast to float32 too (the
  interpreter computes bf16 arithmetic wrongly; bf16 products are exact in float32, so the
  result is what the tensor cores compute) and bf16 copies are made by torch.
* **Extra memory** is ``O(S N)``: the partials, plus the outputs (and the cached copy).

Under the interpreter (CPU tests) the kernels are launched without the autotuner (which
fails there with several configs) and with large tiles, since the interpreter's cost is
per program and per loop iteration.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastdia.device import sm_count, triton_interpreting
from fastdia.errors import ConfigError
from fastdia.ops.checks import DOT_PRECISIONS, FLOAT_DTYPES, check_out_buffer, check_precision

__all__ = ["clear_weight_cache", "round_to_vocab", "rounding_mismatches"]

DEFAULT_PRECISION = "bf16"
PRECISIONS = ("bf16", *DOT_PRECISIONS)
_BF16_UNIT = 2.0**-8  # bf16 unit roundoff (8 significand bits, round to nearest)
_MERGE_BLOCK_N = 32
_PREP_BLOCK_N = 16
_FALLBACK_SPLITS = 32  # vocabulary slices of the fp32 re-scan of flagged rows
_FALLBACK_META = {"BLOCK_M": 16, "BLOCK_V": 64, "BLOCK_K": 32}


def bf16_window_factor(d: int) -> float:
    """``2 delta_n / (||z_n|| max_v ||E_v||)``: the width of the window of bf16 scores that
    may hold the fp32 argmax (see the module docstring), with a little slack for the float32
    computation of the norms themselves."""
    u = _BF16_UNIT
    return 2.0 * (2.0 * u + u * u + 2.0 * d * 2.0**-24) * (1.0 + 2.0**-10)


@triton.jit
def _prep_kernel(
    z_ptr,
    zb_ptr,
    win_ptr,
    enorm_ptr,
    N,
    D,
    stride_z,
    factor,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row: the window ``factor ||z_n|| max||E_v||`` ``[N]`` and (``CAST``) ``z`` in bf16."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        zc = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
        zc = zc.to(tl.float32)
        sumsq += tl.sum(zc * zc, axis=1)
        if CAST:
            tl.store(zb_ptr + rows[:, None] * D + cols[None, :], zc.to(tl.bfloat16), mask=mask)
    win = factor * tl.sqrt(sumsq) * tl.load(enorm_ptr)
    tl.store(win_ptr + rows, win, mask=rmask)


@triton.jit
def _round_kernel(
    z_ptr,
    w_ptr,
    bias_ptr,
    val_ptr,
    idx_ptr,
    cnt_ptr,
    win_ptr,
    flag_ptr,
    N,
    V,
    D,
    stride_z,
    stride_w,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    STORE_VAL: tl.constexpr,
    TOP2: tl.constexpr,
    ROW_FLAGS: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Partial ``(max, argmax)`` of rows ``m`` over vocabulary slice ``s``: ``[S, N]`` out.

    One flat loop over ``(vocab tile, d chunk)`` pairs, so the software pipeline runs
    across vocabulary tiles without draining; the argmax epilogue runs after a tile's last
    ``d`` chunk. Rows past ``N`` and vocabulary entries past ``V`` are clamped to the last
    valid one for the loads (no masks on the hot loads) and discarded afterwards.

    ``TOP2`` also keeps the second best ``[S, N]`` (stored after the first ``S N`` entries
    of ``val``/``idx``) and counts, into ``cnt [S, N]`` int32, the ids whose score is within
    ``win[n]`` of the running maximum, restarting the count whenever the maximum rises by
    more than ``win[n]`` (an upper bound on the ids within ``win[n]`` of the final one).
    ``ROW_FLAGS`` skips row tiles in which no row has ``flag[n] != 0``.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_s = tl.num_programs(1)
    v_per_split = tl.cdiv(tl.cdiv(V, num_s), BLOCK_V) * BLOCK_V
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    z_rows = z_ptr + tl.minimum(rows, N - 1)[:, None] * stride_z
    v_start = pid_s * v_per_split
    n_tiles = tl.cdiv(tl.minimum(V - v_start, v_per_split), BLOCK_V)
    if ROW_FLAGS:
        flags = tl.load(flag_ptr + rows, mask=rmask, other=0)
        n_tiles = n_tiles * (tl.max(flags, axis=0) != 0).to(tl.int32)
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32) + v_start
    if TOP2:
        second = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        second_idx = tl.zeros([BLOCK_M], dtype=tl.int32) + v_start
        count = tl.zeros([BLOCK_M], dtype=tl.int32)
        win = tl.load(win_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    num_k = tl.cdiv(D, BLOCK_K)
    kt = 0
    v0 = v_start
    for _ in range(0, n_tiles * num_k):
        cols = v0 + offs_v
        ks = kt * BLOCK_K + offs_k
        a_ptrs = z_rows + ks[None, :]
        b_ptrs = w_ptr + tl.minimum(cols, V - 1)[:, None] * stride_w + ks[None, :]
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(ks < D)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(ks < D)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if kt == num_k - 1:
            cmask = cols < V
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
            acc = tl.where(cmask[None, :], acc, float("-inf"))
            tile_max, tile_arg = tl.max(
                acc, axis=1, return_indices=True, return_indices_tie_break_left=True
            )
            better = tile_max > best  # strict: an earlier tile keeps its tie
            if TOP2:
                rest = tl.where(offs_v[None, :] == tile_arg[:, None], float("-inf"), acc)
                tile_2nd, tile_arg2 = tl.max(
                    rest, axis=1, return_indices=True, return_indices_tie_break_left=True
                )
                # the new second best: the old best or the tile's second (if the tile wins),
                # else the old second or the tile's best; ties keep the earlier id
                keep_v = tl.where(better, best, second)
                keep_i = tl.where(better, best_idx, second_idx)
                new_v = tl.where(better, tile_2nd, tile_max)
                new_i = tl.where(better, v0 + tile_arg2, v0 + tile_arg)
                take = new_v > keep_v
                second = tl.where(take, new_v, keep_v)
                second_idx = tl.where(take, new_i, keep_i)
            if TOP2:
                # ids counted so far are <= the old best: none is in the new window if the
                # best rose by more than its width
                floor = tl.where(better, tile_max, best) - win
                count = tl.where(best >= floor, count, 0)
                count += tl.sum((acc >= floor[:, None]).to(tl.int32), axis=1)
            best = tl.where(better, tile_max, best)
            best_idx = tl.where(better, v0 + tile_arg, best_idx)
            acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
            kt = 0
            v0 += BLOCK_V
        else:
            kt += 1
    out = pid_s * N + rows
    if STORE_VAL:
        tl.store(val_ptr + out, best, mask=rmask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=rmask)
    if TOP2:
        tl.store(val_ptr + num_s * N + out, second, mask=rmask)
        tl.store(idx_ptr + num_s * N + out, second_idx.to(tl.int64), mask=rmask)
        tl.store(cnt_ptr + out, count, mask=rmask)


@triton.jit
def _finish_top2_kernel(
    val_ptr,
    idx_ptr,
    cnt_ptr,
    win_ptr,
    z_ptr,
    w_ptr,
    bias_ptr,
    ids_ptr,
    flag_ptr,
    N,
    S,
    D,
    stride_z,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits' top two, re-score both exactly in float32 and pick (ties to the
    lower id); flag rows with more than two ids in the window for the fp32 re-scan."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    b1 = tl.load(val_ptr + rows, mask=rmask, other=float("-inf"))
    i1 = tl.load(idx_ptr + rows, mask=rmask, other=0)
    b2 = tl.load(val_ptr + S * N + rows, mask=rmask, other=float("-inf"))
    i2 = tl.load(idx_ptr + S * N + rows, mask=rmask, other=0)
    count = tl.load(cnt_ptr + rows, mask=rmask, other=0)
    win = tl.load(win_ptr + rows, mask=rmask, other=0.0)
    for s in range(1, S):
        v1 = tl.load(val_ptr + s * N + rows, mask=rmask, other=float("-inf"))
        j1 = tl.load(idx_ptr + s * N + rows, mask=rmask, other=0)
        v2 = tl.load(val_ptr + (S + s) * N + rows, mask=rmask, other=float("-inf"))
        j2 = tl.load(idx_ptr + (S + s) * N + rows, mask=rmask, other=0)
        # each split counted ids <= its own best: keep a count only if that best is in the
        # window of the merged best
        floor = tl.maximum(b1, v1) - win
        count = tl.where(b1 >= floor, count, 0)
        count += tl.where(v1 >= floor, tl.load(cnt_ptr + s * N + rows, mask=rmask, other=0), 0)
        better = v1 > b1  # strict: the earlier split (lower ids) keeps its tie
        keep_v = tl.where(better, b1, b2)
        keep_i = tl.where(better, i1, i2)
        new_v = tl.where(better, v2, v1)
        new_i = tl.where(better, j2, j1)
        take = new_v > keep_v
        b2 = tl.where(take, new_v, keep_v)
        i2 = tl.where(take, new_i, keep_i)
        b1 = tl.where(better, v1, b1)
        i1 = tl.where(better, j1, i1)
    s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        zc = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
        e1 = tl.load(w_ptr + i1[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        e2 = tl.load(w_ptr + i2[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        zc = zc.to(tl.float32)
        s1 += tl.sum(zc * e1.to(tl.float32), axis=1)
        s2 += tl.sum(zc * e2.to(tl.float32), axis=1)
    if HAS_BIAS:
        s1 += tl.load(bias_ptr + i1, mask=rmask, other=0.0)
        s2 += tl.load(bias_ptr + i2, mask=rmask, other=0.0)
    has2 = b2 > float("-inf")
    pick2 = has2 & ((s2 > s1) | ((s2 == s1) & (i2 < i1)))
    tl.store(ids_ptr + rows, tl.where(pick2, i2, i1), mask=rmask)
    tl.store(flag_ptr + rows, (count > 2).to(tl.int32), mask=rmask)


@triton.jit
def _merge_kernel(
    val_ptr,
    idx_ptr,
    ids_ptr,
    flag_ptr,
    wbits_ptr,
    emb_ptr,
    N,
    S,
    D,
    stride_w,
    MERGE: tl.constexpr,
    ROW_FLAGS: tl.constexpr,
    RETURN_EMB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row the first split holding the maximum (``MERGE``; with ``ROW_FLAGS`` only for
    flagged rows, the others keep ``ids``); optionally gathers ``E[ids]`` bits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if MERGE:
        best = tl.load(val_ptr + rows, mask=rmask, other=0.0)
        best_idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
        for s in range(1, S):
            val = tl.load(val_ptr + s * N + rows, mask=rmask, other=0.0)
            idx = tl.load(idx_ptr + s * N + rows, mask=rmask, other=0)
            better = val > best  # strict: the lowest split (lowest ids) keeps its tie
            best = tl.where(better, val, best)
            best_idx = tl.where(better, idx, best_idx)
        if ROW_FLAGS:
            flagged = tl.load(flag_ptr + rows, mask=rmask, other=0) != 0
            best_idx = tl.where(flagged, best_idx, tl.load(ids_ptr + rows, mask=rmask, other=0))
        tl.store(ids_ptr + rows, best_idx, mask=rmask)
    else:
        best_idx = tl.load(ids_ptr + rows, mask=rmask, other=0)
    if RETURN_EMB:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            bits = tl.load(wbits_ptr + best_idx[:, None] * stride_w + cols[None, :], mask=mask)
            tl.store(emb_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], bits, mask=mask)


# H100/H200 configs. 16-bit operands (the bf16 path included): a tensor-core GEMM (wgmma for
# BLOCK_M >= 64) with an argmax epilogue, or, for small N, a stream over E split across the
# SMs. float32 operands use tf32x3 (three tf32 products) by request, whose operand splits
# need about twice the registers: smaller d chunks. Every config here compiled for sm_90
# without register spills in the argmax-only kernel (checked offline with triton.compile for
# GPUTarget("cuda", 90, 32) and cuobjdump -res-usage); the top-two epilogue holds a second
# [BLOCK_M, BLOCK_V] tile, so it is pruned to tiles of at most 128 x 128.
_CONFIGS_16 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bv, bk, w, st in (
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (16, 256, 64, 4, 3),
    )
]
_CONFIGS_32 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bv, bk, w, st in (
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (32, 128, 32, 4, 3),
        (16, 128, 32, 4, 3),
    )
]
_CONFIGS = _CONFIGS_16 + _CONFIGS_32
_TOP2_MAX_TILE = 128 * 128


def _candidates(configs: list, wide: bool, top2: bool) -> list:
    """The configs made for the operands' width (float32 or 16-bit), and for the top-two
    epilogue only tiles of at most ``_TOP2_MAX_TILE`` scores."""
    keep = [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == wide]
    if top2:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_V"] <= _TOP2_MAX_TILE]
    return keep or configs


def _prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    wide = bool(kwargs.get("UPCAST")) or named_args["w_ptr"].dtype == torch.float32
    return _candidates(configs, wide, bool(kwargs.get("TOP2")))


_TUNE_KEY = ["N", "V", "D", "HAS_BIAS", "UPCAST", "STORE_VAL", "TOP2", "PRECISION"]
_round_tuned = triton.autotune(
    configs=_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)(triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BLOCK_K"] == 0})(_round_kernel))


def _interpreter_meta(n: int, d: int) -> dict[str, int]:
    """Few, large tiles: the interpreter's cost is per program and per loop trip."""
    return {
        "BLOCK_M": max(16, min(64, triton.next_power_of_2(n))),
        "BLOCK_V": 1024,
        "BLOCK_K": max(16, min(1024, triton.next_power_of_2(d))),
    }


def split_count(
    n: int, v: int, block_m: int, block_v: int, sms: int, requested: int | None = None
) -> int:
    """Vocabulary slices ``S`` of the grid ``(cdiv(n, block_m), S)``.

    ``requested`` (else about two programs per SM, at least two ``block_v`` tiles per slice,
    and 1 without a GPU, ``sms <= 1``) normalised so that no slice is empty: the kernel
    recomputes the slice width ``cdiv(cdiv(v, S), block_v) block_v``, which gives back ``S``.
    """
    if requested is None:
        if sms <= 1:
            return 1
        row_tiles = triton.cdiv(n, block_m)
        requested = max(1, min(triton.cdiv(2 * sms, row_tiles), triton.cdiv(v, 2 * block_v)))
    per_split = triton.cdiv(triton.cdiv(v, max(1, int(requested))), block_v) * block_v
    return triton.cdiv(v, per_split)


@dataclass
class _Bf16Copy:
    ref: weakref.ref
    version: int
    ptr: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    weight: torch.Tensor  # [V, d] bf16, contiguous
    max_norm: torch.Tensor  # [1] float32: max_v ||E_v|| (slightly rounded up)


_BF16_CACHE: dict[int, _Bf16Copy] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def bf16_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached bf16 copy of a float32 ``weight [V, d]`` and ``max_v ||weight_v||`` ``[1]``.

    One entry per live tensor object: reused while its storage pointer, shape, strides and
    version counter are unchanged (an in-place update bumps the version and makes a new
    copy; so does passing a new view of the same storage), dropped when the tensor is
    garbage collected. Tensors made under ``torch.inference_mode`` have no version counter:
    in-place updates of those are not detected (call :func:`clear_weight_cache`). Make the
    first call outside CUDA graph capture (as for autotuning).
    """
    key = id(weight)
    entry = _BF16_CACHE.get(key)
    if (
        entry is not None
        and entry.ref() is weight
        and entry.version == _version(weight)
        and entry.ptr == weight.data_ptr()
        and entry.shape == tuple(weight.shape)
        and entry.stride == tuple(weight.stride())
    ):
        return entry.weight, entry.max_norm
    copy = weight.to(torch.bfloat16).contiguous()
    norms = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64)
    max_norm = (norms.max() * (1.0 + 2.0**-20)).to(torch.float32).reshape(1)

    def _drop(_: weakref.ref, key: int = key) -> None:
        current = _BF16_CACHE.get(key)
        if current is not None and current.ref() is None:
            _BF16_CACHE.pop(key, None)

    _BF16_CACHE[key] = _Bf16Copy(
        weakref.ref(weight, _drop),
        _version(weight),
        weight.data_ptr(),
        tuple(weight.shape),
        tuple(weight.stride()),
        copy,
        max_norm,
    )
    return copy, max_norm


def clear_weight_cache() -> None:
    """Drop every cached bf16 copy of an embedding matrix."""
    _BF16_CACHE.clear()


def _check_buffers(
    lead: torch.Size,
    d: int,
    weight: torch.Tensor,
    device: torch.device,
    out: torch.Tensor | None,
    out_embeddings: torch.Tensor | None,
    return_embeddings: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The flat ids buffer ``[N]`` int64 and the embeddings buffer (or None), checked."""
    n = 1
    for size in lead:
        n *= size
    if out is None:
        ids = torch.empty(n, dtype=torch.int64, device=device)
    else:
        ids = check_out_buffer(out, tuple(lead), torch.int64, device, "out").view(-1)
    emb = None
    if return_embeddings:
        shape = (*lead, d)
        if out_embeddings is None:
            emb = torch.empty(shape, dtype=weight.dtype, device=device)
        else:
            emb = check_out_buffer(out_embeddings, shape, weight.dtype, device, "out_embeddings")
    return ids, emb


def round_to_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_embeddings: bool = False,
    out: torch.Tensor | None = None,
    out_embeddings: torch.Tensor | None = None,
    num_splits: int | None = None,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round ``z`` to token ids with fused Triton kernels (the ``[N, V]`` scores never
    reach memory).

    Args:
        z: ``[..., d]`` float32, float16 or bfloat16.
        weight: ``[V, d]`` the embedding matrix ``E``, same dtypes (may differ from ``z``'s).
        bias: ``[V]`` (any float dtype, used as float32) or None.
        return_embeddings: also return ``weight[ids]`` ``[..., d]`` in ``weight``'s dtype.
        out: optional int64 buffer of ``z.shape[:-1]`` for the ids (every element written).
        out_embeddings: optional contiguous buffer ``[..., d]`` of ``weight``'s dtype for
            ``weight[ids]``.
        num_splits: vocabulary slices of the main kernel (None: chosen from ``N``, the
            device and the autotuned tile); for tests.
        precision: for a float32 ``weight``: ``"bf16"`` (default: scores against a cached
            bf16 copy of ``weight``, near ties re-scored in float32, the fp32 argmax) or
            plain float32 products with ``tl.dot`` precision ``"tf32x3"`` (fp32-level),
            ``"ieee"`` (exact fp32) or ``"tf32"``. Ignored for 16-bit ``weight``.

    Returns:
        ``ids [...]`` int64 (ties to the lowest id), and with ``return_embeddings`` also
        ``weight[ids]``.

    Raises:
        ConfigError: shapes or devices disagree, an unsupported dtype, a bad buffer.
    """
    if weight.dim() != 2 or z.dim() < 1 or z.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"need z [..., d] and weight [V, d], got {list(z.shape)} and {list(weight.shape)}"
        )
    for name, x in (("z", z), ("weight", weight)):
        if x.dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{name} has dtype {x.dtype}; the triton round_to_vocab takes float32, float16 "
                f"or bfloat16: cast it first (e.g. {name}.float())"
            )
    if weight.device != z.device:
        raise ConfigError(f"weight is on {weight.device} but z is on {z.device}")
    check_precision(precision, PRECISIONS)
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ConfigError(f"num_splits must be a positive int or None, got {num_splits!r}")
    device = z.device
    lead = z.shape[:-1]
    v, d = weight.shape
    flat = z.reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    given_weight = weight
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    n = flat.shape[0]
    if v == 0:
        raise ConfigError("weight has no rows: the vocabulary is empty")
    if max(n * flat.stride(0), v * weight.stride(0)) >= 2**31:
        raise ConfigError(
            f"z ({n} x {d}) or weight ({v} x {d}) has 2**31 elements or more (the kernel uses "
            "int32 offsets): round in chunks of rows"
        )
    if bias is not None:
        if bias.shape != (v,):
            raise ConfigError(f"bias must be [V={v}], got {list(bias.shape)}")
        bias = bias.to(device=device, dtype=torch.float32).contiguous()
    ids, emb = _check_buffers(lead, d, weight, device, out, out_embeddings, return_embeddings)
    if n == 0:
        ids = ids.view(lead)
        return (ids, emb) if return_embeddings else ids

    run = _Launch(flat, weight, bias, ids, n, v, d, num_splits, device)
    if weight.dtype == torch.float32 and precision == "bf16":
        run.bf16_then_exact(given_weight, emb)
    else:
        run.direct(precision, emb)
    ids = ids.view(lead)
    return (ids, emb) if return_embeddings else ids


class _Launch:
    """The kernel launches of one :func:`round_to_vocab` call (inputs already checked)."""

    def __init__(
        self,
        flat: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        n: int,
        v: int,
        d: int,
        num_splits: int | None,
        device: torch.device,
    ) -> None:
        self.flat, self.weight, self.bias, self.ids = flat, weight, bias, ids
        self.n, self.v, self.d, self.num_splits, self.device = n, v, d, num_splits, device
        self.interpreting = triton_interpreting()
        self.sms = sm_count(device)

    def _splits(self, meta: dict[str, int]) -> int:
        return split_count(
            self.n, self.v, meta["BLOCK_M"], meta["BLOCK_V"], self.sms, self.num_splits
        )

    def _main(
        self, z: torch.Tensor, w: torch.Tensor, flags: dict[str, object], buffers: tuple
    ) -> int:
        """Launch the main kernel (autotuned on the GPU); returns the ``S`` it ran with."""
        args = (z, w, self.bias if self.bias is not None else z, *buffers)
        args += (self.n, self.v, self.d, z.stride(0), w.stride(0))
        if self.interpreting:
            meta = _interpreter_meta(self.n, self.d)
            splits = self._splits(meta)
            grid = (triton.cdiv(self.n, meta["BLOCK_M"]), splits)
            _round_kernel[grid](*args, **flags, **meta, EVEN_K=self.d % meta["BLOCK_K"] == 0)
            return splits

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return triton.cdiv(self.n, meta["BLOCK_M"]), self._splits(meta)

        _round_tuned[grid](*args, **flags)
        return self._splits(_round_tuned.best_config.kwargs)

    def _max_splits(self, wide: bool, top2: bool) -> int:
        """The largest ``S`` any candidate config can run with (sizes the partials)."""
        if self.interpreting:
            return self._splits(_interpreter_meta(self.n, self.d))
        return max(self._splits(c.kwargs) for c in _candidates(_CONFIGS, wide, top2))

    def _merge(
        self,
        val: torch.Tensor,
        idx: torch.Tensor,
        splits: int,
        emb: torch.Tensor | None,
        *,
        merge: bool = True,
        flags: torch.Tensor | None = None,
    ) -> None:
        bits_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32}[self.weight.element_size()]
        wbits = self.weight.view(bits_dtype)
        emb_bits = emb.view(bits_dtype) if emb is not None else idx
        _merge_kernel[(triton.cdiv(self.n, _MERGE_BLOCK_N),)](
            val,
            idx,
            self.ids,
            flags if flags is not None else idx,
            wbits,
            emb_bits,
            self.n,
            splits,
            self.d,
            self.weight.stride(0),
            MERGE=merge,
            ROW_FLAGS=flags is not None,
            RETURN_EMB=emb is not None,
            BLOCK_N=_MERGE_BLOCK_N,
            BLOCK_D=max(16, min(128, triton.next_power_of_2(self.d))),
        )

    def direct(self, precision: str, emb: torch.Tensor | None) -> None:
        """Plain products in the operands' dtype(s) with ``precision`` for float32 ones."""
        flat, weight = self.flat, self.weight
        upcast = flat.dtype != weight.dtype or (self.interpreting and flat.dtype == torch.bfloat16)
        wide = upcast or weight.dtype == torch.float32
        direct = emb is None and self._max_splits(wide, False) == 1
        if direct:
            val, idx = self.ids, self.ids  # val is not stored
        else:
            s_max = self._max_splits(wide, False)
            val = torch.empty((s_max, self.n), dtype=torch.float32, device=self.device)
            idx = torch.empty((s_max, self.n), dtype=torch.int64, device=self.device)
        flags = {
            "HAS_BIAS": self.bias is not None,
            "UPCAST": upcast,
            "STORE_VAL": not direct,
            "TOP2": False,
            "ROW_FLAGS": False,
            # the precision matters for float32 products only (upcast mixed operands get
            # fp32-level tf32x3 under the "bf16" default); 16-bit dots keep the default
            "PRECISION": ("tf32x3" if precision == "bf16" else precision) if wide else "tf32",
        }
        splits = self._main(flat, weight, flags, (val, idx, idx, val, idx))
        if not direct:
            self._merge(val, idx, splits, emb)

    def bf16_then_exact(self, given_weight: torch.Tensor, emb: torch.Tensor | None) -> None:
        """bf16 scores with the top two and the window count, the exact re-score of the top
        two, the fp32 re-scan of flagged rows, the merge (see the module docstring)."""
        flat, weight, n, d, device = self.flat, self.weight, self.n, self.d, self.device
        wb, max_norm = bf16_weight(given_weight)
        win = torch.empty(n, dtype=torch.float32, device=device)
        if self.interpreting:  # the interpreter's fp32 -> bf16 cast does not round to nearest
            zb = flat.to(torch.bfloat16).contiguous()
        else:
            zb = torch.empty((n, d), dtype=torch.bfloat16, device=device)
        _prep_kernel[(triton.cdiv(n, _PREP_BLOCK_N),)](
            flat,
            zb,
            win,
            max_norm,
            n,
            d,
            flat.stride(0),
            bf16_window_factor(d),
            CAST=not self.interpreting,
            BLOCK_N=_PREP_BLOCK_N,
            BLOCK_D=max(16, min(128, triton.next_power_of_2(d))),
        )
        s_max = self._max_splits(False, True)
        val = torch.empty((2, s_max, n), dtype=torch.float32, device=device)
        idx = torch.empty((2, s_max, n), dtype=torch.int64, device=device)
        cnt = torch.empty((s_max, n), dtype=torch.int32, device=device)
        row_flags = torch.empty(n, dtype=torch.int32, device=device)
        flags = {
            "HAS_BIAS": self.bias is not None,
            "UPCAST": self.interpreting,
            "STORE_VAL": True,
            "TOP2": True,
            "ROW_FLAGS": False,
            "PRECISION": "tf32",  # bf16 operands: the precision is not used
        }
        splits = self._main(zb, wb, flags, (val, idx, cnt, win, row_flags))
        _finish_top2_kernel[(triton.cdiv(n, _MERGE_BLOCK_N),)](
            val,
            idx,
            cnt,
            win,
            flat,
            weight,
            self.bias if self.bias is not None else win,
            self.ids,
            row_flags,
            n,
            splits,
            d,
            flat.stride(0),
            weight.stride(0),
            HAS_BIAS=self.bias is not None,
            BLOCK_N=_MERGE_BLOCK_N,
            BLOCK_D=max(16, min(128, triton.next_power_of_2(d))),
        )
        self._rescan_flagged(row_flags, emb)

    def _rescan_flagged(self, row_flags: torch.Tensor, emb: torch.Tensor | None) -> None:
        """Exact fp32 argmax of the flagged rows (row tiles without one run no iteration)."""
        flat, weight, n, d = self.flat, self.weight, self.n, self.d
        meta = _interpreter_meta(n, d) if self.interpreting else dict(_FALLBACK_META)
        splits = split_count(n, self.v, meta["BLOCK_M"], meta["BLOCK_V"], 0, _FALLBACK_SPLITS)
        val = torch.empty((splits, n), dtype=torch.float32, device=self.device)
        idx = torch.empty((splits, n), dtype=torch.int64, device=self.device)
        args = (flat, weight, self.bias if self.bias is not None else flat)
        args += (val, idx, idx, val, row_flags, n, self.v, d, flat.stride(0), weight.stride(0))
        _round_kernel[(triton.cdiv(n, meta["BLOCK_M"]), splits)](
            *args,
            HAS_BIAS=self.bias is not None,
            UPCAST=flat.dtype != torch.float32,
            STORE_VAL=True,
            TOP2=False,
            ROW_FLAGS=True,
            PRECISION="ieee",
            EVEN_K=d % meta["BLOCK_K"] == 0,
            **meta,
            **({} if self.interpreting else {"num_warps": 4, "num_stages": 3}),
        )
        self._merge(val, idx, splits, emb, flags=row_flags)


def rounding_mismatches(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    ref_ids: torch.Tensor,
    *,
    rel_tol: float | None = None,
) -> tuple[int, int]:
    """Compare ids against reference ids up to float rounding (the docs/design.md §3 argmax check).

    A row may differ from the reference only where the two picks' scores are a near tie:
    recomputed exactly (float64, from the same operand values), the score of the id this
    kernel chose must be at least the reference pick's score minus
    ``rel_tol * (|z| . |E_v| + |bias_v|)`` for the larger of the two. The default
    ``rel_tol = 8 sqrt(d) eps_fp32`` bounds the float32 accumulation error of both sides
    (fp16/bf16 products are exact in float32, so the operand dtype adds nothing).

    Args:
        z: ``[..., d]`` the rounded inputs; weight ``[V, d]``; bias ``[V]`` or None.
        ids, ref_ids: ``[...]`` int64, this kernel's and the reference's.

    Returns:
        ``(differing rows, rows differing by more than the tolerance)``.
    """
    d = weight.shape[1]
    if rel_tol is None:
        rel_tol = 8.0 * d**0.5 * torch.finfo(torch.float32).eps
    flat_z = z.reshape(-1, d)
    got, want = ids.reshape(-1), ref_ids.reshape(-1)
    rows = (got != want).nonzero().flatten()
    if rows.numel() == 0:
        return 0, 0
    zr = flat_z[rows].double()
    wg, ww = weight[got[rows]].double(), weight[want[rows]].double()
    sg, sw = (zr * wg).sum(-1), (zr * ww).sum(-1)
    scale = torch.maximum((zr.abs() * wg.abs()).sum(-1), (zr.abs() * ww.abs()).sum(-1))
    if bias is not None:
        b = bias.double()
        sg, sw = sg + b[got[rows]], sw + b[want[rows]]
        scale = scale + torch.maximum(b[got[rows]].abs(), b[want[rows]].abs())
    bad = sg < sw - rel_tol * scale
    return int(rows.numel()), int(bad.sum())
