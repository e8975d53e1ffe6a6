"""The variants of a fused op that its test file checks against the reference: every
registered backend (:func:`fastdia.ops.registry.backends`) on every device it runs on.

On the CPU: ``reference`` (PyTorch) and ``triton`` under the Triton interpreter
(``TRITON_INTERPRET=1``, which tests/conftest.py sets before triton is imported unless the
environment sets it; the kernels upcast bf16 loads to float32 there, since the interpreter
computes bf16 arithmetic wrongly). On CUDA: every backend, the parameters marked ``cuda``
(skipped without a GPU, tests/conftest.py). Compiled Triton kernels need the interpreter
off; on a GPU machine::

    TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_guided_step.py \\
        tests/test_round_to_vocab.py tests/test_sample_vocab.py

A parameter is ``(backend, device)`` with the id ``"<backend>-<device>"`` (``triton-cpu``,
``cuda-cuda``), so ``-k cuda-cuda`` selects one backend on one device.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from fastdia.device import triton_interpreting
from fastdia.ops import registry

CPU, CUDA = "cpu", "cuda"
# the backends whose kernels run on the CPU (Triton's under the interpreter)
CPU_BACKENDS = ("reference", "triton")


def variant_params(
    op: str,
    *,
    backends: Iterable[str] | None = None,
    devices: Iterable[str] = (CPU, CUDA),
) -> list[Any]:
    """``pytest.param(backend, device)`` for each registered backend of ``op`` (or those of
    ``backends`` that are registered) on each of ``devices`` it runs on; CUDA ones marked
    ``cuda``. Collected whether or not the machine can run them (see :func:`load`)."""
    wanted = None if backends is None else set(backends)
    params = []
    for device in devices:
        for backend in registry.backends(op):
            if wanted is not None and backend not in wanted:
                continue
            if device == CPU and backend not in CPU_BACKENDS:
                continue
            marks = [pytest.mark.cuda] if device == CUDA else []
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


@dataclass(frozen=True)
class Variant:
    """One backend of an op on one device, called like the reference.

    Attributes:
        op, backend, device: what runs where.
        fn: the registered implementation (:func:`fastdia.ops.registry.get`).
        knobs: the tuning keywords this backend takes (``num_splits``, ``d_groups``,
            ``precision``); the others are dropped from a call, since they change how a
            variant computes, never what.
        defaults: keywords added to every call unless given (e.g. Triton's exact mode).
    """

    op: str
    backend: str
    device: str
    fn: Callable[..., Any]
    knobs: frozenset[str] = frozenset()
    defaults: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if k not in TUNING_KNOBS or k in self.knobs}
        return self.fn(*args, **{**self.defaults, **kwargs})

    def to(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """``tensors`` moved to this variant's device (None stays None)."""
        return tuple(None if t is None else t.to(self.device) for t in tensors)


TUNING_KNOBS = frozenset({"num_splits", "d_groups", "precision"})


def load(
    op: str,
    backend: str,
    device: str,
    *,
    knobs: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> Variant:
    """The variant, or a skip saying why it cannot run here.

    Skips: no CUDA device; triton not installed; triton on the CPU without the interpreter,
    or on CUDA under it. The ``cuda`` backend is loaded (built just in time unless
    installed prebuilt) on a CUDA device, and a failure fails the test with the reason.
    """
    if device == CUDA and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if device == CPU and not triton_interpreting():
            pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
        if device == CUDA and triton_interpreting():
            pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 for compiled kernels")
    if backend == "cuda" and device == CUDA:
        from fastdia.ops import cuda_ops

        cuda_ops.load()  # the first test builds the extension; a failure names the problem
    assert registry.resolve_backend(backend, op, device) == backend
    return Variant(op, backend, device, registry.get(op, backend), frozenset(knobs), defaults or {})
