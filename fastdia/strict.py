"""A strict mode that catches, on the CPU, what would break a CUDA graph (docs/design.md §2).

Inside :class:`GraphSafeMode` every ATen op is inspected before it runs, and one of these
raises :class:`GraphSafetyError`:

* a **factory op**: a tensor made from host values (``torch.empty``/``zeros``/``ones``/
  ``full``/``arange``/``tensor``/``randn``/..., ``new_*``, ``scalar_tensor``,
  ``lift_fresh``). Such a tensor is baked into a captured graph with the value it had at
  capture time, and one made without ``device=`` lands on the CPU. Ops that take shape,
  dtype and device from an existing tensor (``empty_like``, ``zeros_like``, ...) and the
  intermediate results of arithmetic are allowed: a CUDA graph gives them a private pool;
* a **host read**: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``) and the ops whose output shape depends on values (``nonzero``,
  ``masked_select``, ``unique``, ``equal``);
* a tensor argument or result on **another device** than the plan's (a device-to-host or
  host-to-device copy, a CPU tensor mixed in).

Run the loop once with the plan on the ``meta`` device as well: there a tensor created
without an explicit device is a CPU tensor and fails the device check, and nothing can be
read back at all. Tests use it as::

    with GraphSafeMode(plan.device):
        plan.denoise()

It checks ATen ops only: the launch of a Triton or CUDA C++ kernel is invisible to it (the
tensors that kernel wrappers make are not).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdia.errors import FastdiaError

__all__ = ["FACTORY_OPS", "HOST_READ_OPS", "GraphSafeMode", "GraphSafetyError"]

aten = torch.ops.aten

# overload packets of the ops that create a tensor from host values
FACTORY_OPS = frozenset(
    getattr(aten, name)
    for name in (
        "empty",
        "empty_strided",
        "zeros",
        "ones",
        "full",
        "arange",
        "linspace",
        "logspace",
        "eye",
        "scalar_tensor",
        "lift_fresh",
        "lift_fresh_copy",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
        "randn",
        "rand",
        "randint",
        "randperm",
        "normal",
        "bernoulli",
    )
    if hasattr(aten, name)
)

# ops that read device values back to the host (a synchronisation)
HOST_READ_OPS = frozenset(
    getattr(aten, name)
    for name in (
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
    )
    if hasattr(aten, name)
)


class GraphSafetyError(FastdiaError):
    """An op inside :class:`GraphSafeMode` would break CUDA-graph capture or replay."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


class GraphSafeMode(TorchDispatchMode):
    """Fail on factory ops, host reads and tensors off ``device`` (see the module).

    Args:
        device: the plan's device; every tensor argument and result must be on it.
        raise_errors: raise :class:`GraphSafetyError` at the first violation (default);
            False records every violation in ``violations`` and lets the op run.
        allow_factories_in: names of functions inside which factory ops are allowed,
            for constants that are the same on every replay (e.g. the frequency table of
            :func:`fastdia.models.common.timestep_embedding`, which a context critic
            computes in the loop). Host reads and foreign devices still fail there.
        allow_factories_from: module name prefixes (e.g. ``"transformers"``) whose code
            may run factory ops, on the same terms: for a library forward that builds its
            constants (position ranges, mask fill values) on every call.

    Attributes:
        ops: the name of every op seen, in order.
        violations: one message per violation (when not raising).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        raise_errors: bool = True,
        allow_factories_in: Collection[str] = (),
        allow_factories_from: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.raise_errors = raise_errors
        self.allow_factories_in = frozenset(allow_factories_in)
        self.allow_factories_from = tuple(allow_factories_from)
        self.ops: list[str] = []
        self.violations: list[str] = []

    def _fail(self, message: str) -> None:
        if self.raise_errors:
            raise GraphSafetyError(message)
        self.violations.append(message)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        self.ops.append(name)
        packet = func.overloadpacket
        if packet in FACTORY_OPS and not self._called_from_allowed():
            self._fail(
                f"{name} creates a tensor from host values inside the planned loop; "
                "allocate it in plan() (or derive it from an existing tensor)"
            )
        if packet in HOST_READ_OPS:
            self._fail(f"{name} reads a device value back to the host")
        self._check_devices(name, tree_leaves((args, kwargs)), "an argument")
        out = func(*args, **kwargs)
        self._check_devices(name, tree_leaves(out), "its result")
        return out

    def _called_from_allowed(self) -> bool:
        if not self.allow_factories_in and not self.allow_factories_from:
            return False
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name in self.allow_factories_in:
                return True
            module = frame.f_globals.get("__name__", "")
            if self.allow_factories_from and module.startswith(self.allow_factories_from):
                return True
            frame = frame.f_back
        return False

    def _check_devices(self, name: str, leaves: list[Any], what: str) -> None:
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and not _same_device(leaf.device, self.device):
                self._fail(
                    f"{name}: {what} is on {leaf.device}, the plan on {self.device} "
                    "(a host transfer, or a tensor created without device=)"
                )
                return
