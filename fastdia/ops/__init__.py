"""Fused ops, each with its PyTorch reference beside it and a registry of variants.

Public entry points dispatch through :mod:`fastdia.ops.registry`; ``backend="auto"``
takes the fastest variant available on the input's device.
"""

from __future__ import annotations

import torch

from fastdia.ops import registry
from fastdia.ops.step import TokenLocalStack

GUIDED_STEP, ROUND_TO_VOCAB = "guided_step", "round_to_vocab"
SAMPLER_OPS = (GUIDED_STEP, ROUND_TO_VOCAB)

registry.register(GUIDED_STEP, "reference", "fastdia.ops.step:guided_step_reference")
registry.register(ROUND_TO_VOCAB, "reference", "fastdia.ops.rounding:round_to_vocab_reference")


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
