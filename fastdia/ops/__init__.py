"""Fused ops, each with its PyTorch reference beside it and a registry of variants.

Public entry points dispatch through :mod:`fastdia.ops.registry`; ``backend="auto"``
takes the fastest variant available on the input's device.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from fastdia.device import triton_interpreting
from fastdia.ops import cuda_build, registry

# Each op's reference lives in a module of its own name (``<op>_ref``), so the public
# functions below never share a name with a submodule.
from fastdia.ops.guided_step_ref import TokenLocalStack

GUIDED_STEP, ROUND_TO_VOCAB = "guided_step", "round_to_vocab"
SAMPLE_VOCAB = "sample_vocab"
SAMPLER_OPS = (GUIDED_STEP, ROUND_TO_VOCAB)

registry.register(GUIDED_STEP, "reference", "fastdia.ops.guided_step_ref:guided_step_reference")
registry.register(
    ROUND_TO_VOCAB, "reference", "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference"
)
registry.register(SAMPLE_VOCAB, "reference", "fastdia.ops.gumbel:sample_vocab_reference")


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    """Whether triton can be imported (looked up without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1``."""
    if not _triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def _triton_auto(device: torch.device) -> bool:
    """``auto`` picks Triton on CUDA only: the interpreter is far slower than the reference."""
    return device.type == "cuda" and not triton_interpreting() and _triton_installed()


_TRITON_HINT = (
    "the triton variant needs a CUDA device and the triton package; on the CPU it runs only "
    "under the interpreter, TRITON_INTERPRET=1, set before triton is imported"
)
for _op, _target in (
    (GUIDED_STEP, "fastdia.kernels.guided_step:guided_step"),
    (ROUND_TO_VOCAB, "fastdia.kernels.round_to_vocab:round_to_vocab"),
    (SAMPLE_VOCAB, "fastdia.kernels.sample_vocab:sample_vocab"),
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

# CUDA C++ kernels (csrc/), built lazily: ``auto`` takes them only where a stored
# measurement (fastdia.ops.measured) shows them fastest on the device; a request where they
# cannot build or run fails with the reason and what to install (cuda_build.hint).
for _op, _target in (
    (GUIDED_STEP, "fastdia.ops.cuda_ops:guided_step"),
    (ROUND_TO_VOCAB, "fastdia.ops.cuda_ops:round_to_vocab"),
):
    registry.register(
        _op,
        "cuda",
        _target,
        available=cuda_build.available,
        priority=5,
        auto=lambda device: False,
        hint=cuda_build.hint,
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


def sample_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """One token per row of ``z [N, d]`` drawn from ``softmax(z weight^T + bias)``.

    Gumbel-max with fastdia's Philox numbering (row ``n`` under its own seed, element
    ``v`` at ``step``), without writing the scores in fused variants; see
    :mod:`fastdia.ops.gumbel`. A backend without a ``sample_vocab`` variant falls back to
    the reference. ``seed``: per-row seeds ``[N]`` int64 on ``z``'s device, or one seed
    ``s`` (row ``n`` takes ``s + n``); ``step``: an int or a 1-element integer tensor on
    ``z``'s device. Returns ``[N]`` int64.
    """
    if backend not in (None, registry.AUTO, *registry.backends(SAMPLE_VOCAB)):
        backend = "reference"
    name = registry.resolve_backend(backend, SAMPLE_VOCAB, z.device)
    return registry.get(SAMPLE_VOCAB, name)(z, weight, bias, seed=seed, step=step)


from fastdia.ops.gumbel import gumbel_argmax  # noqa: E402  (re-exported)


def guided_step(
    z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, *, backend: str | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guided reverse step; see :func:`fastdia.ops.guided_step_ref.guided_step_reference`
    for the arguments, shapes and dtypes, which every variant shares."""
    name = registry.resolve_backend(backend, GUIDED_STEP, z.device)
    return registry.get(GUIDED_STEP, name)(z, eps, coef, **kwargs)


__all__ = [
    "TokenLocalStack",
    "guided_step",
    "gumbel_argmax",
    "registry",
    "round_to_vocab",
    "sample_vocab",
]
