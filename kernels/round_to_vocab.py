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

Modules
-------
This module checks the arguments and calls the launcher; the rest sits beside it:
:mod:`~fastdia.kernels.round_to_vocab_jit` (the Triton kernels),
:mod:`~fastdia.kernels.round_to_vocab_configs` (autotuning configs, the interpreter's tiles,
the split count), :mod:`~fastdia.kernels.round_to_vocab_launch` (the launches of one call)
and :mod:`~fastdia.kernels.weight_cache` (the cached bf16 copies of ``E``). The argmax
check of the tests, :func:`fastdia.ops.round_to_vocab_ref.rounding_mismatches`, sits beside
the reference.
"""

from __future__ import annotations

import torch
from fastdia.kernels.round_to_vocab_launch import DEFAULT_PRECISION, PRECISIONS, Launch
from fastdia.kernels.weight_cache import clear_weight_cache

from fastdia.errors import ConfigError
from fastdia.ops.checks import FLOAT_DTYPES, check_out_buffer, check_precision

__all__ = ["clear_weight_cache", "round_to_vocab"]


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

    run = Launch(flat, weight, bias, ids, n, v, d, num_splits, device)
    if weight.dtype == torch.float32 and precision == "bf16":
        run.bf16_then_exact(given_weight, emb)
    else:
        run.direct(precision, emb)
    ids = ids.view(lead)
    return (ids, emb) if return_embeddings else ids
