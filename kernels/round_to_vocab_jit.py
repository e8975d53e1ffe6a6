"""The Triton kernels of ``round_to_vocab`` (see :mod:`fastdia.kernels.round_to_vocab` for
the design): the per-row prep of the bf16 path, the main tiled ``(max, argmax)`` kernel, the
top-two finish with its exact float32 re-score, and the merge of the vocabulary splits
(with the bit-exact gather of ``E[ids]``).

Launched by :mod:`fastdia.kernels.round_to_vocab_launch`; the autotuned wrapper of the main
kernel is in :mod:`fastdia.kernels.round_to_vocab_configs`.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["finish_top2_kernel", "merge_kernel", "prep_kernel", "round_kernel"]


@triton.jit
def prep_kernel(
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
def round_kernel(
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
def finish_top2_kernel(
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
def merge_kernel(
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
