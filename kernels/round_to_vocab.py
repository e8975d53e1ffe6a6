"""Fused Triton ``round_to_vocab``: ``argmax_v <E_v, z> + bias_v`` without writing the scores.

Same call signature and semantics as
:func:`fastdia.ops.rounding.round_to_vocab_reference` (``z [..., d]`` in, int64 ids
``[...]`` out, ties to the lowest id, optional ``E[ids]``).

Design
------
* **Main kernel, grid ``(cdiv(N, BLOCK_M), S)``.** Program ``(m, s)`` owns ``BLOCK_M`` rows
  of ``z`` and the vocabulary slice ``[s * Vs, (s + 1) * Vs)`` (``Vs`` a multiple of every
  ``BLOCK_V``). It walks the slice in ``BLOCK_V`` tiles; each tile is a ``[BLOCK_M,
  BLOCK_V]`` score block accumulated in float32 registers by ``tl.dot`` over ``d`` in
  ``BLOCK_K`` chunks (the last chunk masked: any ``d``), plus the bias; columns past ``V``
  are ``-inf``. The (tile, chunk) pairs form one flat loop, so the software pipeline
  (``num_stages``) keeps prefetching across tiles, and out-of-range rows and vocabulary
  entries are clamped for the loads rather than masked. A running ``(max, argmax)`` per
  row is updated from each tile's
  ``tl.max(..., return_indices=True, return_indices_tie_break_left=True)`` with a *strict*
  ``>``, so ties keep the earliest (lowest) id both inside a tile and across tiles. The
  ``[N, V]`` scores never reach memory.
* **Vocabulary split.** When ``N`` is small there are too few row tiles to fill the GPU,
  so the vocabulary is split into ``S`` slices (about two programs per SM in all); each
  program writes a partial ``(max, argmax)`` to ``[S, N]`` buffers (float32, int64), and
  a tiny merge kernel takes, per row, the first split holding the maximum (strict ``>``
  over splits in order), so the lowest id wins ties exactly as ``torch.argmax``. With
  ``S == 1`` and no embeddings the main kernel writes the ids directly.
* **``E[ids]``** (``return_embeddings``) is gathered by the merge kernel on the raw bits of
  ``E`` (an int16/int32 view), so the copy is exact for every dtype.
* **Dtypes.** fp32, fp16 and bf16 operands; the products accumulate in float32. Equal
  16-bit dtypes use the tensor cores natively; float32 operands use ``tf32x3`` products
  (fp32-level accuracy) by default, ``precision="ieee"`` for exact fp32 FMAs; mixed dtypes
  are upcast to float32 in registers. Under ``TRITON_INTERPRET=1`` bf16 loads are upcast to
  float32 too (the interpreter computes bf16 arithmetic wrongly).
* **Extra memory** is ``O(S N)``: the partials, plus the outputs.

Under the interpreter (CPU tests) the kernels are launched without the autotuner (which
fails there with several configs) and with large tiles, since the interpreter's cost is
per program and per loop iteration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastdia.errors import ConfigError

__all__ = ["round_to_vocab"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_PRECISIONS = ("tf32x3", "ieee", "tf32")
_GPU_V_ALIGN = 256  # every GPU config's BLOCK_V divides it
_MERGE_BLOCK_N = 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_kernel(
    z_ptr,
    w_ptr,
    bias_ptr,
    val_ptr,
    idx_ptr,
    N,
    V,
    D,
    stride_z,
    stride_w,
    v_per_split,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    STORE_VAL: tl.constexpr,
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
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    z_rows = z_ptr + tl.minimum(rows, N - 1)[:, None] * stride_z
    v_start = pid_s * v_per_split
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32) + v_start
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    num_k = tl.cdiv(D, BLOCK_K)
    kt = 0
    v0 = v_start
    for _ in range(0, (v_per_split // BLOCK_V) * num_k):
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


@triton.jit
def _merge_kernel(
    val_ptr,
    idx_ptr,
    ids_ptr,
    wbits_ptr,
    emb_ptr,
    N,
    S,
    D,
    stride_w,
    RETURN_EMB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row the first split holding the maximum; optionally gathers ``E[ids]`` bits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    best = tl.load(val_ptr + rows, mask=rmask, other=0.0)
    best_idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    for s in range(1, S):
        val = tl.load(val_ptr + s * N + rows, mask=rmask, other=0.0)
        idx = tl.load(idx_ptr + s * N + rows, mask=rmask, other=0)
        better = val > best  # strict: the lowest split (lowest ids) keeps its tie
        best = tl.where(better, val, best)
        best_idx = tl.where(better, idx, best_idx)
    tl.store(ids_ptr + rows, best_idx, mask=rmask)
    if RETURN_EMB:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            bits = tl.load(wbits_ptr + best_idx[:, None] * stride_w + cols[None, :], mask=mask)
            tl.store(emb_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], bits, mask=mask)


# H100/H200 configs. 16-bit operands: a tensor-core GEMM (wgmma for BLOCK_M >= 64) with an
# argmax epilogue, or, for small N, a stream over E split across the SMs. float32 operands
# use tf32x3 (three tf32 products), whose operand splits need about twice the registers:
# smaller d chunks. Every config here compiles for sm_90 without register spills (checked
# offline with triton.compile for GPUTarget("cuda", 90, 32) and cuobjdump -res-usage).
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


def _prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep the configs made for the operands' width (float32 or 16-bit)."""
    wide = kwargs.get("UPCAST") or named_args["w_ptr"].dtype == torch.float32
    keep = [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == bool(wide)]
    return keep or configs


_TUNE_KEY = ["N", "V", "D", "v_per_split", "HAS_BIAS", "UPCAST", "STORE_VAL", "PRECISION"]
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


def _num_splits(n: int, v: int, device: torch.device, align: int) -> int:
    """Vocabulary slices so that about two programs run per SM (1 for large N)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(2 * sms, row_tiles), triton.cdiv(v, 2 * align)))


def round_to_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_embeddings: bool = False,
    out: torch.Tensor | None = None,
    out_embeddings: torch.Tensor | None = None,
    num_splits: int | None = None,
    precision: str = "tf32x3",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round ``z`` to token ids with one fused Triton kernel (plus a tiny merge).

    Args:
        z: ``[..., d]`` float32, float16 or bfloat16.
        weight: ``[V, d]`` the embedding matrix ``E``, same dtypes (may differ from ``z``'s:
            mixed operands are upcast to float32).
        bias: ``[V]`` (any float dtype, used as float32) or None.
        return_embeddings: also return ``weight[ids]`` ``[..., d]`` in ``weight``'s dtype.
        out: optional int64 buffer of ``z.shape[:-1]`` for the ids (every element written).
        out_embeddings: optional contiguous buffer ``[..., d]`` of ``weight``'s dtype for
            ``weight[ids]``.
        num_splits: vocabulary slices (None: chosen from ``N`` and the device); for tests.
        precision: ``tl.dot`` input precision for float32 operands on the GPU:
            ``"tf32x3"`` (default, fp32-level), ``"ieee"`` or ``"tf32"``.

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
        if x.dtype not in _SUPPORTED:
            raise ConfigError(
                f"{name} has dtype {x.dtype}; the triton round_to_vocab takes float32, float16 "
                f"or bfloat16: cast it first (e.g. {name}.float())"
            )
    if weight.device != z.device:
        raise ConfigError(f"weight is on {weight.device} but z is on {z.device}")
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    device = z.device
    lead = z.shape[:-1]
    v, d = weight.shape
    flat = z.reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
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

    if out is None:
        ids = torch.empty(n, dtype=torch.int64, device=device)
    else:
        if (
            out.shape != lead
            or out.dtype != torch.int64
            or not out.is_contiguous()
            or out.device != device
        ):
            raise ConfigError(
                f"out must be a contiguous int64 tensor of shape {list(lead)} on {device}"
            )
        ids = out.view(-1)
    emb = None
    if return_embeddings:
        shape = (*lead, d)
        if out_embeddings is None:
            emb = torch.empty(shape, dtype=weight.dtype, device=device)
        elif (
            out_embeddings.shape != shape
            or out_embeddings.dtype != weight.dtype
            or not out_embeddings.is_contiguous()
            or out_embeddings.device != device
        ):
            raise ConfigError(
                f"out_embeddings must be a contiguous {weight.dtype} tensor of shape {list(shape)}"
            )
        else:
            emb = out_embeddings
    if n == 0:
        ids = ids.view(lead)
        return (ids, emb) if return_embeddings else ids

    interpreting = _interpreting()
    meta = _interpreter_meta(n, d) if interpreting else {}
    align = meta["BLOCK_V"] if interpreting else _GPU_V_ALIGN
    splits = _num_splits(n, v, device, align) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ConfigError(f"num_splits must be >= 1, got {num_splits}")
    v_per_split = triton.cdiv(triton.cdiv(v, splits), align) * align
    splits = triton.cdiv(v, v_per_split)
    direct = splits == 1 and not return_embeddings
    if direct:
        val, idx = ids, ids  # val is not stored
    else:
        val = torch.empty((splits, n), dtype=torch.float32, device=device)
        idx = torch.empty((splits, n), dtype=torch.int64, device=device)

    upcast = flat.dtype != weight.dtype or (interpreting and flat.dtype == torch.bfloat16)
    args = (flat, weight, bias if bias is not None else flat, val, idx)
    args += (n, v, d, flat.stride(0), weight.stride(0), v_per_split)
    flags = {
        "HAS_BIAS": bias is not None,
        "UPCAST": upcast,
        "STORE_VAL": not direct,
        # the precision matters for float32 products only; 16-bit dots keep Triton's default
        "PRECISION": precision if upcast or flat.dtype == torch.float32 else "tf32",
    }
    if interpreting:
        grid = (triton.cdiv(n, meta["BLOCK_M"]), splits)
        _round_kernel[grid](*args, **flags, **meta, EVEN_K=d % meta["BLOCK_K"] == 0)
    else:

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_M"]), splits)

        _round_tuned[grid](*args, **flags)

    if not direct:
        bits_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32}[weight.element_size()]
        wbits = weight.view(bits_dtype)
        emb_bits = emb.view(bits_dtype) if emb is not None else idx
        block_d = max(16, min(128, triton.next_power_of_2(d)))
        _merge_kernel[(triton.cdiv(n, _MERGE_BLOCK_N),)](
            val,
            idx,
            ids,
            wbits,
            emb_bits,
            n,
            splits,
            d,
            weight.stride(0),
            RETURN_EMB=return_embeddings,
            BLOCK_N=_MERGE_BLOCK_N,
            BLOCK_D=block_d,
        )
    ids = ids.view(lead)
    return (ids, emb) if return_embeddings else ids


def rounding_mismatches(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    ref_ids: torch.Tensor,
    *,
    rel_tol: float | None = None,
) -> tuple[int, int]:
    """Compare ids against reference ids up to float rounding (the DESIGN §3 argmax check).

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
