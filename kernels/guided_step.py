"""Fused Triton ``guided_step``: one reverse step with critic guidance in one kernel pass.

Same call signature and semantics as :func:`fastdia.ops.guided_step_ref.guided_step_reference`::

    z'[n] = a z[n] + b eps[n] + (c lambda) g[n] + s zeta(seed_b, step, i d + j),  n = b L + i
    g[n]  = grad[n] + (silu'(pre[n]) * w2) W1 / L,   pre[n] = z[n] W1^T + b1
    h_b   = mean_{n in sequence b} w2 . silu(pre[n]) + b2

Design
------
* **Tiling.** A program owns ``BLOCK_N`` tokens (rows) and walks ``d`` in chunks of
  ``BLOCK_D`` columns (a power of two; the tail chunk is masked, so any ``d`` works: 576,
  768, 577, ...). All ``H`` hidden units of the critic stack sit in one register tile
  (``BLOCK_H = next_pow2(H)``, masked; padded units have ``w2 = 0`` and contribute nothing).
  Pass A over the ``d`` chunks accumulates ``pre = z W1^T`` with ``tl.dot``; the
  elementwise middle gives ``silu``, the token values ``w2 . silu(pre)`` and
  ``gp = silu'(pre) * w2``; pass B over the ``d`` chunks computes ``gp W1_chunk`` with
  ``tl.dot``, adds the optional precomputed ``grad``, draws the noise of elements
  ``i d + j`` of sequence ``b`` under its seed ``seed_b`` in registers (the key
  ``(seed_b << 32) | step`` is one value per row of the tile) and writes ``z'`` once.
  ``z`` and ``eps`` are read from HBM once (pass B re-reads the program's own ``z`` tile,
  an L1/L2 hit). The noise follows
  :mod:`fastdia.noise`: one Philox4x32-10 draw (``tl.randn4x``) serves four consecutive
  elements, so when ``d % 4 == 0`` a chunk holds whole groups and draws once per four
  elements (``randn_groups``); other ``d`` draw once per element and keep the element's
  lane (``randn_lanes``). Chunking ``d`` rather than padding it to ``next_pow2(d)`` keeps
  the Philox work and the registers on real columns only:
  ``d = 576`` padded to 1024 would waste 44% of the noise generation, which on a GPU
  costs about as much as the memory traffic.
* **Grid: row tiles x d groups.** ``(cdiv(N, BLOCK_N), G)``: program ``(m, g)`` owns the
  row tile ``m`` (tiles may straddle sequences; per-sample coefficients are gathered per
  row) and writes the ``g``-th of ``G`` equal groups of ``d`` chunks. The sampler's
  ``N = B L`` is a few hundred tokens, i.e. 4 to 32 row tiles, far from filling an H100's
  132 SMs, so ``G`` is chosen per autotuned config as ``min(chunks, SMs // row tiles)``
  (as many programs as fit in one wave), and ``G = 1`` once the row tiles fill more than
  half the GPU (``N`` >= about 4K).
  *Cost, and why one kernel.* The critic's pre-activation ``pre = z W1^T`` needs all of
  ``d``, so every group recomputes pass A for its row tile: per extra group
  ``2 BLOCK_N H d`` tensor-core FLOPs plus the ``[BLOCK_N, d]`` z tile and the ``[H, d]``
  ``W1`` re-read from L2 (HBM traffic is unchanged: z, eps and z' still cross it once).
  The alternative, a first kernel writing ``silu'(pre) w2`` ``[N, H]`` and a second
  ``(row tile x d chunk)`` kernel, avoids the recompute but adds a launch and an ``[N, H]``
  round trip to every step, and a second code path for the sequence mode; at the few
  hundred tokens where the split matters the step is latency-bound, the recompute runs
  in parallel on otherwise idle SMs, and the autotuner trades it off itself (a smaller
  ``BLOCK_N`` gives more row tiles and fewer groups). Without a critic the split costs
  nothing. ``d_groups=`` overrides ``G`` (tests use it under the interpreter, where
  ``G = 1`` by default).
* **Adaptive noise (``noise_kappa > 0``) and ``return_h``: sequence mode.** ``h_b`` needs
  every token of sequence ``b`` before any noise of that sequence can be scaled by
  ``exp(-kappa h_b)``. With ``kappa > 0`` or ``return_h`` the grid is ``(B, G)``: one
  program per sequence and d group loops over the sequence's row tiles (each group
  computes ``h_b`` itself; group 0 stores it). With ``kappa > 0`` it first
  runs pass A only over all tiles (the critic forward, half the matmul work) to get
  ``h_b``, then the full step; the second read of ``z`` comes mostly from L2. ``h_b`` is
  reduced inside one program, so it is deterministic (no atomics). With ``kappa == 0`` and
  no ``return_h`` (the sampler's default) the row-tile grid is used.
* **CUDA-graph safe.** The per-sequence seeds ``[B]``, ``step``, ``guidance``, the
  coefficients and ``b2`` are read from device tensors in the kernel; the Philox keys
  ``(seed_b << 32) | step`` are built in-kernel. Python numbers are turned into 0-d
  tensors with ``torch.full`` (a fill kernel, capturable, but a captured graph replays
  the value it had at capture: the sampler passes device tensors,
  ``tests/test_graph_safe.py`` checks that the host side then makes no tensor); nothing
  calls ``.item()``. Autotuning runs at the first call of a shape: warm up before
  capturing a graph.
* **Precision.** Everything is float32. ``z``, ``eps`` and ``grad`` may be fp16/bf16 too:
  they are upcast in registers after the load. The critic matmuls use ``tf32`` tensor-core
  products by default on the GPU: their operands are rounded to 10-bit mantissas, which
  perturbs the guidance gradient ``g`` by about 1e-3 relative (``c lambda g`` is one term
  of the update, and the critic that produced ``g`` is itself a rough imitation of the
  reward), at three times the rate of ``tf32x3``. ``precision="ieee"`` (exact fp32 FMAs,
  what the tests compare against the reference in) and ``"tf32x3"`` (fp32-level) are
  there for checks; the interpreter ignores the choice and computes in fp32.

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernel is launched without the autotuner
(which fails there with several configs) and with large blocks, since the interpreter's
cost is per program and per loop iteration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdia.device import sm_count, triton_interpreting
from fastdia.errors import ConfigError
from fastdia.noise import row_seeds
from fastdia.ops.checks import (
    FLOAT_DTYPES,
    check_out_buffer,
    check_precision,
    critic_weights,
    device_scalar,
    step_shape,
)
from fastdia.ops.guided_step_ref import TokenLocalStack

from .randn import randn_groups, randn_lanes

__all__ = ["guided_step"]

DEFAULT_PRECISION = "tf32"


@triton.jit
def _critic_pre(
    z_ptr,
    w1_ptr,
    rows,
    rmask,
    offs_h,
    hmask,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass A: ``z[rows] @ W1^T`` as ``[BLOCK_N, BLOCK_H]`` float32, over d chunks."""
    pre = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        zc = tl.load(
            z_ptr + rows[:, None] * D + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        wc = tl.load(
            w1_ptr + offs_h[:, None] * D + cols[None, :],
            mask=hmask[:, None] & cmask[None, :],
            other=0.0,
        )
        pre = tl.dot(zc, tl.trans(wc), pre, input_precision=PRECISION)
    return pre


@triton.jit
def _critic_values(pre, b1, w2):
    """Token values ``w2 . silu(pre + b1)`` ``[BLOCK_N]`` and ``silu'(pre + b1) * w2``."""
    pre = pre + b1[None, :]
    sig = tl.sigmoid(pre)
    hv = tl.sum(pre * sig * w2[None, :], axis=1)
    gp = sig * (1.0 + pre * (1.0 - sig)) * w2[None, :]
    return hv, gp


@triton.jit
def _step_rows(
    z_ptr,
    eps_ptr,
    grad_ptr,
    out_ptr,
    coef_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    rows,
    rmask,
    seed_ptr,
    step,
    lam,
    noise_mult,
    D,
    d_lo,
    d_hi,
    H,
    L,
    HAS_CRITIC: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    NOISE_GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The whole step for ``rows`` (``[BLOCK_N]`` int32, masked by ``rmask``), columns
    ``[d_lo, d_hi)`` of ``z'`` (the critic's pass A still runs over all ``D`` columns).

    Writes ``z'[rows, d_lo:d_hi]`` and returns the token values ``w2 . silu(pre)``
    ``[BLOCK_N]`` (zeros without a critic, garbage on masked rows).
    """
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    if HAS_CRITIC:
        pre = _critic_pre(
            z_ptr, w1_ptr, rows, rmask, offs_h, hmask, D, BLOCK_N, BLOCK_D, BLOCK_H, PRECISION
        )
        b1 = tl.load(b1_ptr + offs_h, mask=hmask, other=0.0)
        w2 = tl.load(w2_ptr + offs_h, mask=hmask, other=0.0)
        hv, gp = _critic_values(pre, b1, w2)
    else:
        hv = tl.zeros([BLOCK_N], dtype=tl.float32)
        gp = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    if PER_SAMPLE:
        cbase = coef_ptr + (rows // L) * 4
        a = tl.load(cbase, mask=rmask, other=0.0)[:, None]
        b = tl.load(cbase + 1, mask=rmask, other=0.0)[:, None]
        c = tl.load(cbase + 2, mask=rmask, other=0.0)[:, None]
        s = tl.load(cbase + 3, mask=rmask, other=0.0)[:, None]
    else:
        a = tl.load(coef_ptr)
        b = tl.load(coef_ptr + 1)
        c = tl.load(coef_ptr + 2)
        s = tl.load(coef_ptr + 3)
    cl = c * lam
    s = s * noise_mult
    # per-row noise: sequence b = row // L under its own seed, element i d + j of the
    # sequence (i = row % L), so a sequence's noise does not depend on the batch
    seq_seed = tl.load(seed_ptr + rows // L, mask=rmask, other=0).to(tl.int64)
    key = ((seq_seed << 32) | step)[:, None]
    pos = rows % L
    for d0 in range(d_lo, d_hi, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d_hi
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        zc = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ec = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = a * zc + b * ec
        if HAS_CRITIC or HAS_GRAD:
            if HAS_GRAD:
                g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                g = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            if HAS_CRITIC:
                wc = tl.load(
                    w1_ptr + offs_h[:, None] * D + cols[None, :],
                    mask=hmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                g += tl.dot(gp, wc, input_precision=PRECISION) / L
            acc += cl * g
        if NOISE_GROUPS:  # d % 4 == 0: the chunk holds whole groups, one draw per four
            groups = pos[:, None] * (D // 4) + (d0 // 4 + tl.arange(0, BLOCK_D // 4))[None, :]
            acc += s * randn_groups(key, groups)
        else:  # int32: the noise counter i d + j
            acc += s * randn_lanes(key, pos[:, None] * D + cols[None, :])
        tl.store(out_ptr + offs, acc, mask=mask)
    return hv


@triton.jit
def _guided_step_kernel(
    z_ptr,
    eps_ptr,
    grad_ptr,
    out_ptr,
    h_ptr,
    coef_ptr,
    seed_ptr,
    step_ptr,
    lam_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    kappa,
    N,
    D,
    H,
    L,
    HAS_CRITIC: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    SEQ_MODE: tl.constexpr,
    USE_KAPPA: tl.constexpr,
    RETURN_H: tl.constexpr,
    NOISE_GROUPS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), G)`` row tiles, or ``(B, G)`` sequences when ``SEQ_MODE``;
    program ``(p, g)`` writes the ``g``-th of ``G`` equal groups of ``BLOCK_D`` chunks."""
    pid = tl.program_id(0)
    per_group = tl.cdiv(tl.cdiv(D, BLOCK_D), tl.num_programs(1)) * BLOCK_D
    d_lo = tl.program_id(1) * per_group
    d_hi = tl.minimum(D, d_lo + per_group)
    step = tl.load(step_ptr).to(tl.int64)
    lam = tl.load(lam_ptr)
    if SEQ_MODE:
        first = pid * L
        offs_n = tl.arange(0, BLOCK_N)
        noise_mult = 1.0
        if USE_KAPPA:
            # pass 1: the critic forward over the whole sequence gives h_b
            offs_h = tl.arange(0, BLOCK_H)
            hmask = offs_h < H
            b1 = tl.load(b1_ptr + offs_h, mask=hmask, other=0.0)
            w2 = tl.load(w2_ptr + offs_h, mask=hmask, other=0.0)
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for t0 in range(0, L, BLOCK_N):
                rmask = t0 + offs_n < L
                rows = first + t0 + offs_n
                pre = _critic_pre(
                    z_ptr,
                    w1_ptr,
                    rows,
                    rmask,
                    offs_h,
                    hmask,
                    D,
                    BLOCK_N,
                    BLOCK_D,
                    BLOCK_H,
                    PRECISION,
                )
                hv, _ = _critic_values(pre, b1, w2)
                total += tl.where(rmask, hv, 0.0)
            h = tl.sum(total, axis=0) / L + tl.load(b2_ptr)
            noise_mult = tl.exp(-kappa * h)
        # pass 2: the step itself
        total2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t0 in range(0, L, BLOCK_N):
            rmask = t0 + offs_n < L
            rows = first + t0 + offs_n
            hv = _step_rows(
                z_ptr,
                eps_ptr,
                grad_ptr,
                out_ptr,
                coef_ptr,
                w1_ptr,
                b1_ptr,
                w2_ptr,
                rows,
                rmask,
                seed_ptr,
                step,
                lam,
                noise_mult,
                D,
                d_lo,
                d_hi,
                H,
                L,
                HAS_CRITIC,
                HAS_GRAD,
                PER_SAMPLE,
                NOISE_GROUPS,
                BLOCK_N,
                BLOCK_D,
                BLOCK_H,
                PRECISION,
            )
            total2 += tl.where(rmask, hv, 0.0)
        if RETURN_H:
            if tl.program_id(1) == 0:
                if USE_KAPPA:
                    tl.store(h_ptr + pid, h)
                else:
                    tl.store(h_ptr + pid, tl.sum(total2, axis=0) / L + tl.load(b2_ptr))
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        _step_rows(
            z_ptr,
            eps_ptr,
            grad_ptr,
            out_ptr,
            coef_ptr,
            w1_ptr,
            b1_ptr,
            w2_ptr,
            rows,
            rmask,
            seed_ptr,
            step,
            lam,
            1.0,
            D,
            d_lo,
            d_hi,
            H,
            L,
            HAS_CRITIC,
            HAS_GRAD,
            PER_SAMPLE,
            NOISE_GROUPS,
            BLOCK_N,
            BLOCK_D,
            BLOCK_H,
            PRECISION,
        )


# H100/H200 configs. The kernel is bound by HBM traffic and by the Philox integer work (one
# Philox4x32-10 per four elements when d % 4 == 0: the register checks below predate that
# and drew one per element), plus, with a critic, two [BLOCK_N, d] x [d, H] tf32 matmuls
# against an L2-resident W1. Small d chunks keep the Philox temporaries (and, in tf32x3 mode,
# the operand splits) in registers; the grid's d groups are cut from these chunks, and the
# small-BLOCK_N configs give the sampler's few hundred tokens more row tiles. Checked offline
# before the d groups were added, in tf32x3 mode (triton.compile for GPUTarget("cuda", 90,
# 32), then cuobjdump -res-usage): on the row-tile path with H = 128 these configs had at
# most a 32-128 byte stack (32 bytes is libdevice's cos slow path, never taken here); H = 256
# and the sequence mode (kappa > 0) spilled a few hundred bytes in some of them.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bn, bd, w, st in (
        (64, 32, 8, 2),
        (64, 64, 8, 2),
        (32, 64, 8, 2),
        (64, 32, 8, 3),
        (128, 32, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 4, 2),
        (16, 64, 4, 2),
    )
]
_TUNE_KEY = [
    "N",
    "D",
    "H",
    "L",
    "HAS_CRITIC",
    "HAS_GRAD",
    "PER_SAMPLE",
    "SEQ_MODE",
    "USE_KAPPA",
    "RETURN_H",
    "NOISE_GROUPS",
    "BLOCK_H",
    "PRECISION",
]
_guided_step_tuned = triton.autotune(configs=_CONFIGS, key=_TUNE_KEY)(_guided_step_kernel)


def d_groups_for(
    programs: int, d: int, block_d: int, sms: int, requested: int | None = None
) -> int:
    """The number ``G`` of d groups of the grid ``(programs, G)``.

    ``requested`` (else the most groups that still fit in one wave, ``sms // programs``:
    a second, partial wave would cost a whole extra pass A per program) is clamped to
    ``[1, cdiv(d, block_d)]`` and normalised so that every group is non-empty: the kernel
    recomputes each group's chunk count as ``cdiv(cdiv(d, block_d), G)``, which gives back
    the same ``G``.
    """
    chunks = max(1, triton.cdiv(d, block_d))
    if requested is None:
        requested = sms // max(1, programs)
    groups = max(1, min(int(requested), chunks))
    return triton.cdiv(chunks, triton.cdiv(chunks, groups))


def _interpreter_meta(rows: int, d: int) -> dict[str, int]:
    """Few, large programs: the interpreter's cost is per program and per loop trip."""
    return {
        "BLOCK_N": max(16, min(64, triton.next_power_of_2(rows))),
        "BLOCK_D": max(16, min(1024, triton.next_power_of_2(d))),
    }


def _float_input(x: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape) != shape:
        raise ConfigError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        x = x.float()
    return x.contiguous()


def guided_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    *,
    seq_len: int,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    guidance: float | torch.Tensor = 0.0,
    critic: TokenLocalStack | None = None,
    grad: torch.Tensor | None = None,
    noise_kappa: float = 0.0,
    return_h: bool = False,
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    precision: str = DEFAULT_PRECISION,
    d_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guided reverse step as one fused Triton kernel.

    Arguments and results as :func:`fastdia.ops.guided_step_ref.guided_step_reference`, plus
    optional output buffers and the critic matmul precision.

    Args:
        z: ``[N, d]`` current state, ``N = B * seq_len``; float32 (fp16/bf16 are upcast in
            the kernel, other dtypes cast to float32 first).
        eps: ``[N, d]`` the denoiser's noise estimate, same dtypes.
        coef: ``[4]`` or ``[B, 4]`` ``(a, b, c, s)`` (cast to float32 on ``z``'s device).
        seq_len: tokens per sequence ``L``.
        seed: per-sequence seeds ``[B]`` int64 on ``z``'s device, or one seed ``s`` (an int
            in ``[0, 2**31)`` or a 1-element tensor: sequence ``b`` takes ``s + b``); read
            on the device, their range is then the caller's responsibility.
        step: the noise step, an int in ``[0, 2**31)`` or a 1-element integer tensor.
        guidance: ``lambda``, a number or a 1-element tensor.
        critic: token-local stack at one row (``b1 [H]``), or None.
        grad: ``[N, d]`` extra guidance gradient, or None.
        noise_kappa: adaptive noise strength ``kappa >= 0`` (a Python float); used only with
            a critic, as in the reference.
        return_h: also return the stack's value per sequence.
        out: optional ``[N, d]`` float32 contiguous buffer for ``z'`` (every element is
            written).
        h_out: optional ``[B]`` float32 buffer for ``h`` (with ``return_h`` and a critic).
        precision: ``tl.dot`` input precision of the critic matmuls on the GPU:
            ``"tf32"`` (default, ~1e-3 relative error in the guidance gradient),
            ``"tf32x3"`` (fp32-level) or ``"ieee"`` (exact fp32, for comparisons).
        d_groups: split ``d`` into this many groups of columns in the grid (None: fill the
            GPU's SMs, 1 under the interpreter); for tests.

    Returns:
        ``(z' [N, d] float32, h [B] float32 or None)``.

    Raises:
        ConfigError: bad shapes, a seed or step out of range, ``N * d >= 2**31``.
    """
    n, d, batch = step_shape(z, seq_len)
    check_precision(precision)
    if d_groups is not None and (
        isinstance(d_groups, bool) or not isinstance(d_groups, int) or d_groups < 1
    ):
        raise ConfigError(f"d_groups must be a positive int or None, got {d_groups!r}")
    device = z.device
    z = _float_input(z, "z", (n, d))
    eps = _float_input(eps, "eps", (n, d))
    if eps.device != device:
        raise ConfigError(f"eps is on {eps.device} but z is on {device}")
    if grad is not None:
        grad = _float_input(grad, "grad", (n, d)).to(device)

    coef = coef.to(device=device, dtype=torch.float32)
    if coef.shape == (4,):
        per_sample = False
    elif coef.shape == (batch, 4):
        per_sample = True
    else:
        raise ConfigError(f"coef must be [4] or [B={batch}, 4], got {list(coef.shape)}")
    coef = coef.contiguous()

    seed_t = row_seeds(seed, batch, device)
    step_t = device_scalar(step, torch.int64, device, "step")
    lam_t = device_scalar(guidance, torch.float32, device, "guidance")
    kappa = float(noise_kappa)
    if not kappa >= 0.0:
        raise ConfigError(f"noise_kappa must be >= 0, got {noise_kappa!r}")

    has_critic = critic is not None
    if has_critic:
        w1, b1, w2, b2 = critic_weights(critic, d, device)
        hidden = w1.shape[0]
    else:
        hidden = 1
        w1 = b1 = w2 = b2 = coef  # never read
    use_kappa = has_critic and kappa > 0.0
    want_h = has_critic and return_h
    seq_mode = use_kappa or want_h

    if out is None:
        out = torch.empty((n, d), dtype=torch.float32, device=device)
    else:
        check_out_buffer(out, (n, d), torch.float32, device, "out")
    h = None
    if want_h:
        if h_out is None:
            h = torch.empty(batch, dtype=torch.float32, device=device)
        else:
            h = check_out_buffer(h_out, (batch,), torch.float32, device, "h_out")
    if n == 0 or d == 0:
        return out, h

    args = (z, eps, grad if grad is not None else z, out, h if h is not None else out)
    args += (coef, seed_t, step_t, lam_t, w1, b1, w2, b2, kappa, n, d, hidden, seq_len)
    flags = {
        "HAS_CRITIC": has_critic,
        "HAS_GRAD": grad is not None,
        "PER_SAMPLE": per_sample,
        "SEQ_MODE": seq_mode,
        "USE_KAPPA": use_kappa,
        "RETURN_H": want_h,
        "NOISE_GROUPS": d % 4 == 0,  # every BLOCK_D is a multiple of 4
        "BLOCK_H": max(16, triton.next_power_of_2(hidden)),
        "PRECISION": precision,
    }
    sms = sm_count(device)

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        programs = batch if seq_mode else triton.cdiv(n, meta["BLOCK_N"])
        return programs, d_groups_for(programs, d, meta["BLOCK_D"], sms, d_groups)

    if triton_interpreting():
        meta = _interpreter_meta(seq_len if seq_mode else n, d)
        _guided_step_kernel[grid(meta)](*args, **flags, **meta)
    else:
        _guided_step_tuned[grid](*args, **flags)
    return out, h
