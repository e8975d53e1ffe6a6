"""Tile configs of the main ``round_to_vocab`` kernel: the H100/H200 autotuning candidates
and their pruning by operand width and epilogue, the interpreter's tiles, and the count of
vocabulary slices ``S`` a grid runs with (sized from the row tile that runs: see
"Vocabulary split, sized after autotuning" in :mod:`fastdia.kernels.round_to_vocab`).
"""

from __future__ import annotations

import torch
import triton
from fastdia.kernels.round_to_vocab_jit import round_kernel

__all__ = ["CONFIGS", "candidates", "interpreter_meta", "round_tuned", "split_count"]


# H100/H200 configs. 16-bit operands (the bf16 path included): a tensor-core GEMM (wgmma for
# BLOCK_M >= 64) with an argmax epilogue, or, for small N, a stream over E split across the
# SMs. float32 operands use tf32x3 (three tf32 products) by request, whose operand splits
# need about twice the registers: smaller d chunks. Every config here compiled for sm_90
# without register spills in the argmax-only kernel (checked offline with triton.compile for
# GPUTarget("cuda", 90, 32) and cuobjdump -res-usage); the top-two epilogue holds a second
# [BLOCK_M, BLOCK_V] tile, so it is pruned to tiles of at most 128 x 128.
CONFIGS_16 = [
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
CONFIGS_32 = [
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
CONFIGS = CONFIGS_16 + CONFIGS_32
TOP2_MAX_TILE = 128 * 128


def candidates(configs: list, wide: bool, top2: bool) -> list:
    """The configs made for the operands' width (float32 or 16-bit), and for the top-two
    epilogue only tiles of at most ``TOP2_MAX_TILE`` scores."""
    keep = [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == wide]
    if top2:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_V"] <= TOP2_MAX_TILE]
    return keep or configs


def _prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    wide = bool(kwargs.get("UPCAST")) or named_args["w_ptr"].dtype == torch.float32
    return candidates(configs, wide, bool(kwargs.get("TOP2")))


_TUNE_KEY = ["N", "V", "D", "HAS_BIAS", "UPCAST", "STORE_VAL", "TOP2", "PRECISION"]
round_tuned = triton.autotune(
    configs=CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)(triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BLOCK_K"] == 0})(round_kernel))


def interpreter_meta(n: int, d: int) -> dict[str, int]:
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
