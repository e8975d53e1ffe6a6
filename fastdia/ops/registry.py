"""The variant registry: each fused op has named implementations chosen at build time.

A variant is registered with the dotted path of its function (``"module:function"``), so
registering costs nothing: the module (and Triton, or a CUDA extension) is imported only
when the variant is first used. The backend is chosen when a sampler is built, from an
argument, else ``$FASTDIA_BACKEND``, else ``"auto"``; ``"auto"`` takes the available
variant with the highest priority on the device among those *eligible for auto* there
(a variant may run on a device without being a sensible default on it: Triton kernels run
on the CPU under ``TRITON_INTERPRET=1``, far slower than the reference). On a CUDA device
a stored measurement comes first: ``"auto"`` takes the variant that
:mod:`fastdia.ops.measured` records as fastest for the op on a device of that name, when it
runs there; without one it keeps the priorities (triton on CUDA). Unknown names fail with
the list of known ones; symbols are never swapped at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdia.errors import ConfigError

AUTO = "auto"
ENV_VAR = "FASTDIA_BACKEND"


@dataclass
class Variant:
    """One implementation of an op.

    Attributes:
        target: ``"package.module:function"`` of the implementation.
        available: ``available(device) -> bool``, whether it can run on that device.
        priority: ``auto`` prefers higher values among eligible variants.
        auto: ``auto(device) -> bool``, whether ``auto`` may pick it on that device (only
            ever asked when ``available(device)`` holds); None means "whenever available".
        hint: appended to the error raised when it is requested where it cannot run; a
            string, or ``hint(device) -> str`` for a reason that depends on the machine.
    """

    target: str
    available: Callable[[torch.device], bool]
    priority: int
    auto: Callable[[torch.device], bool] | None = None
    hint: str | Callable[[torch.device], str] = ""
    _fn: Callable[..., Any] | None = field(default=None, repr=False)

    def load(self) -> Callable[..., Any]:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn


_REGISTRY: dict[str, dict[str, Variant]] = {}


def register(
    op: str,
    backend: str,
    target: str,
    *,
    available: Callable[[torch.device], bool] = lambda device: True,
    priority: int = 0,
    auto: Callable[[torch.device], bool] | None = None,
    hint: str | Callable[[torch.device], str] = "",
) -> None:
    """Register ``target`` as the ``backend`` variant of ``op``.

    ``available(device)`` says whether the variant can run there (an explicit request for
    it fails otherwise); ``auto(device)``, if given, further restricts where ``"auto"``
    may choose it; ``hint`` is added to the error for a request where it cannot run.
    """
    _REGISTRY.setdefault(op, {})[backend] = Variant(target, available, priority, auto, hint)


def backends(op: str) -> list[str]:
    """The registered backend names of ``op``."""
    return list(_REGISTRY.get(op, {}))


def known_backends() -> list[str]:
    """Every backend name registered for any op, plus ``"auto"``."""
    names = {name for variants in _REGISTRY.values() for name in variants}
    return [AUTO, *sorted(names)]


def requested(name: str | None) -> str:
    """The backend asked for: ``name``, else ``$FASTDIA_BACKEND``, else ``"auto"``."""
    return name or os.environ.get(ENV_VAR) or AUTO


def resolve_backend(name: str | None, op: str, device: torch.device | str) -> str:
    """The concrete backend for ``op`` on ``device`` given a requested ``name``.

    ``None`` reads ``$FASTDIA_BACKEND`` and defaults to ``"auto"``.

    Raises:
        ConfigError: the name is unknown, or the variant cannot run on ``device``.
    """
    device = torch.device(device)
    asked = requested(name)
    variants = _REGISTRY.get(op, {})
    if asked == AUTO:
        measured = _measured_fastest(op, device, variants)
        if measured is not None:
            return measured
        usable = [
            (v.priority, b)
            for b, v in variants.items()
            if v.available(device) and (v.auto is None or v.auto(device))
        ]
        if not usable:
            raise ConfigError(f"no variant of {op} runs on {device}")
        return max(usable)[1]
    if asked not in variants:
        raise ConfigError(
            f"unknown backend {asked!r} for {op}; known: {', '.join([AUTO, *variants])}"
        )
    variant = variants[asked]
    if not variant.available(device):
        hint = variant.hint(device) if callable(variant.hint) else variant.hint
        raise ConfigError(
            f"backend {asked!r} of {op} cannot run on {device}; use 'reference' or 'auto'"
            + (f" ({hint})" if hint else "")
        )
    return asked


def _measured_fastest(op: str, device: torch.device, variants: dict[str, Variant]) -> str | None:
    """The variant a stored profile measured fastest for ``op`` on ``device``, if it runs
    there (CUDA devices only; None without a measurement)."""
    if device.type != "cuda":
        return None
    from fastdia.ops import measured

    name = measured.fastest(op, device)
    if name in variants and variants[name].available(device):
        return name
    return None


def get(op: str, backend: str) -> Callable[..., Any]:
    """The implementation of ``op`` for a concrete (already resolved) ``backend``."""
    try:
        return _REGISTRY[op][backend].load()
    except KeyError:
        raise ConfigError(
            f"unknown backend {backend!r} for {op}; known: {', '.join(backends(op))}"
        ) from None
