"""The kernel launches of one ``round_to_vocab`` call (inputs already checked by
:func:`fastdia.kernels.round_to_vocab.round_to_vocab`): the direct path (plain products in
the operands' dtypes, partials merged when the vocabulary is split) and the bf16 path for a
float32 ``E`` (bf16 scores with the top two and a window count, the exact re-score of the
top two, the float32 re-scan of flagged rows); see the design in
:mod:`fastdia.kernels.round_to_vocab`.
"""

from __future__ import annotations

import torch
import triton
from fastdia.kernels.round_to_vocab_configs import (
    CONFIGS,
    candidates,
    interpreter_meta,
    round_tuned,
    split_count,
)
from fastdia.kernels.round_to_vocab_jit import (
    finish_top2_kernel,
    merge_kernel,
    prep_kernel,
    round_kernel,
)
from fastdia.kernels.weight_cache import bf16_weight

from fastdia.device import sm_count, triton_interpreting
from fastdia.ops.checks import DOT_PRECISIONS

__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "Launch", "bf16_window_factor"]

DEFAULT_PRECISION = "bf16"
PRECISIONS = ("bf16", *DOT_PRECISIONS)
_BF16_UNIT = 2.0**-8  # bf16 unit roundoff (8 significand bits, round to nearest)
_MERGE_BLOCK_N = 32
_PREP_BLOCK_N = 16
_FALLBACK_SPLITS = 32  # vocabulary slices of the fp32 re-scan of flagged rows
_FALLBACK_META = {"BLOCK_M": 16, "BLOCK_V": 64, "BLOCK_K": 32}


def bf16_window_factor(d: int) -> float:
    """``2 delta_n / (||z_n|| max_v ||E_v||)``: the width of the window of bf16 scores that
    may hold the fp32 argmax (see :mod:`fastdia.kernels.round_to_vocab`), with a little
    slack for the float32 computation of the norms themselves."""
    u = _BF16_UNIT
    return 2.0 * (2.0 * u + u * u + 2.0 * d * 2.0**-24) * (1.0 + 2.0**-10)


class Launch:
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
            meta = interpreter_meta(self.n, self.d)
            splits = self._splits(meta)
            grid = (triton.cdiv(self.n, meta["BLOCK_M"]), splits)
            round_kernel[grid](*args, **flags, **meta, EVEN_K=self.d % meta["BLOCK_K"] == 0)
            return splits

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return triton.cdiv(self.n, meta["BLOCK_M"]), self._splits(meta)

        round_tuned[grid](*args, **flags)
        return self._splits(round_tuned.best_config.kwargs)

    def _max_splits(self, wide: bool, top2: bool) -> int:
        """The largest ``S`` any candidate config can run with (sizes the partials)."""
        if self.interpreting:
            return self._splits(interpreter_meta(self.n, self.d))
        return max(self._splits(c.kwargs) for c in candidates(CONFIGS, wide, top2))

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
        merge_kernel[(triton.cdiv(self.n, _MERGE_BLOCK_N),)](
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
        prep_kernel[(triton.cdiv(n, _PREP_BLOCK_N),)](
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
        finish_top2_kernel[(triton.cdiv(n, _MERGE_BLOCK_N),)](
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
        meta = interpreter_meta(n, d) if self.interpreting else dict(_FALLBACK_META)
        splits = split_count(n, self.v, meta["BLOCK_M"], meta["BLOCK_V"], 0, _FALLBACK_SPLITS)
        val = torch.empty((splits, n), dtype=torch.float32, device=self.device)
        idx = torch.empty((splits, n), dtype=torch.int64, device=self.device)
        args = (flat, weight, self.bias if self.bias is not None else flat)
        args += (val, idx, idx, val, row_flags, n, self.v, d, flat.stride(0), weight.stride(0))
        round_kernel[(triton.cdiv(n, meta["BLOCK_M"]), splits)](
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
