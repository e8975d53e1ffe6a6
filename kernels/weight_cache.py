"""Cached bf16 copies of float32 embedding matrices (the ``precision="bf16"`` path of
:mod:`fastdia.kernels.round_to_vocab`): one copy per live weight tensor, remade when the
tensor is updated in place, dropped when it is garbage collected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["bf16_weight", "clear_weight_cache"]


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
