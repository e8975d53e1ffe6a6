"""Fused ops, each with its PyTorch reference beside it and a registry of variants.

Public entry points dispatch through :mod:`fastdia.ops.registry`; ``backend="auto"``
takes the fastest variant available on the input's device.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastdia.ops import registry
from fastdia.ops.step import TokenLocalStack

GUIDED_STEP, ROUND_TO_VOCAB = "guided_step", "round_to_vocab"
SAMPLER_OPS = (GUIDED_STEP, ROUND_TO_VOCAB)

registry.register(GUIDED_STEP, "reference", "fastdia.ops.step:guided_step_reference")
registry.register(ROUND_TO_VOCAB, "reference", "fastdia.ops.rounding:round_to_vocab_reference")


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    """Whether triton can be imported (looked up without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1``."""
    if not _triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _triton_auto(device: torch.device) -> bool:
    """``auto`` picks Triton on CUDA only: the interpreter is far slower than the reference."""
    return device.type == "cuda" and not _interpreting() and _triton_installed()


_TRITON_HINT = (
    "the triton variant needs a CUDA device and the triton package; on the CPU it runs only "
    "under the interpreter, TRITON_INTERPRET=1, set before triton is imported"
)
for _op, _target in (
    (GUIDED_STEP, "fastdia.kernels.guided_step:guided_step"),
    (ROUND_TO_VOCAB, "fastdia.kernels.round_to_vocab:round_to_vocab"),
):
    registry.register(
        _op,
        "triton",
        _target,
        available=_triton_available,
        priority=10,
        auto=_triton_auto,
        hint=_TRITON_HINT,
    )


def round_to_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_embeddings: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``argmax_v <weight_v, z> + bias_v``, without writing the scores.

    Args:
        z: ``[..., d]`` float32, float16 or bfloat16.
        weight: ``[V, d]`` embedding matrix.
        bias: ``[V]`` or None.
        return_embeddings: also return ``weight[ids]`` ``[..., d]``.
        backend: a variant name, or None/``"auto"``.

    Returns:
        ``ids [...]`` int64 (ties to the lowest id), and optionally ``weight[ids]``.
    """
    name = registry.resolve_backend(backend, ROUND_TO_VOCAB, z.device)
    fn = registry.get(ROUND_TO_VOCAB, name)
    return fn(z, weight, bias, return_embeddings=return_embeddings)


def guided_step(
    z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, *, backend: str | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guided reverse step; see :func:`fastdia.ops.step.guided_step_reference`
    for the arguments, shapes and dtypes, which every variant shares."""
    name = registry.resolve_backend(backend, GUIDED_STEP, z.device)
    return registry.get(GUIDED_STEP, name)(z, eps, coef, **kwargs)


__all__ = ["TokenLocalStack", "guided_step", "registry", "round_to_vocab"]
