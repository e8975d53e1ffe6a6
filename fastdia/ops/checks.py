"""Tables and checks every variant of an op shares (the Triton kernels in ``kernels/``, the
CUDA C++ ops in :mod:`fastdia.ops.cuda_ops`): shapes, output buffers, device scalars,
precisions. No triton import here; ``kernels/`` imports this module, never the reverse."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastdia.errors import ConfigError
from fastdia.noise import MAX_INDEX

if TYPE_CHECKING:
    from fastdia.ops.guided_step_ref import TokenLocalStack

# ``tl.dot`` input precisions for float32 operands on the GPU: ``tf32`` (one tensor-core
# product of operands rounded to 10-bit mantissas, ~1e-3 relative error), ``tf32x3`` (three
# tf32 products, fp32-level accuracy at a third of tf32's rate) and ``ieee`` (fp32 FMAs, the
# exact mode tests compare in). The interpreter ignores the choice and computes in fp32.
DOT_PRECISIONS = ("tf32", "tf32x3", "ieee")

# Operand dtypes the kernels load natively (other float dtypes are cast or rejected).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_precision(precision: str, allowed: tuple[str, ...] = DOT_PRECISIONS) -> str:
    """``precision`` if it is one of ``allowed``; else a ConfigError listing them."""
    if precision not in allowed:
        raise ConfigError(f"precision must be one of {', '.join(allowed)}, got {precision!r}")
    return precision


def device_scalar(
    value: int | float | torch.Tensor, dtype: torch.dtype, device: torch.device, name: str
) -> torch.Tensor:
    """A 0-d ``dtype`` tensor on ``device`` holding ``value`` (a kernel's seed, step or
    guidance read from device memory); never reads a device tensor back to the host.

    Raises:
        ConfigError: a tensor of more than one element, a floating tensor or a Python int
            outside ``[0, 2**31)`` for an integer ``dtype``.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(f"{name} must be a scalar or a 1-element tensor, got {value.shape}")
        if not dtype.is_floating_point and (value.is_floating_point() or value.is_complex()):
            raise ConfigError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        return value.reshape(()).to(device=device, dtype=dtype, non_blocking=True)
    if not dtype.is_floating_point and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31
    ):
        raise ConfigError(f"{name} must be an int in [0, 2**31) or a tensor, got {value!r}")
    return torch.full((), value, dtype=dtype, device=device)


def check_out_buffer(
    buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str
) -> torch.Tensor:
    """``buf`` if it is a contiguous ``dtype`` tensor of ``shape`` on ``device`` (a caller's
    output buffer that a kernel writes in place); else a ConfigError naming ``name``."""
    if (
        tuple(buf.shape) != tuple(shape)
        or buf.dtype != dtype
        or not buf.is_contiguous()
        or buf.device != device
    ):
        raise ConfigError(
            f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
            f"got {buf.dtype} {list(buf.shape)} on {buf.device}"
        )
    return buf


def step_shape(z: torch.Tensor, seq_len: int) -> tuple[int, int, int]:
    """``(N, d, B)`` of a guided step's state ``z [N, d]`` of ``B`` sequences of
    ``seq_len`` tokens; a ConfigError unless ``z`` is 2-D, ``seq_len`` a positive int
    dividing ``N`` and ``N d < 2**31`` (the noise uses int32 offsets)."""
    if z.dim() != 2:
        raise ConfigError(f"z must be [N, d], got shape {list(z.shape)}")
    n, d = z.shape
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    if n % seq_len:
        raise ConfigError(f"N = {n} tokens is not a multiple of seq_len = {seq_len}")
    if n * d >= MAX_INDEX:
        raise ConfigError(f"N * d = {n * d} must be < 2**31 (the noise uses int32 offsets)")
    return n, d, n // seq_len


def critic_weights(
    critic: TokenLocalStack, d: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-row stack's ``(w1 [H, d], b1 [H], w2 [H], b2 [])`` as contiguous float32 on
    ``device``, shapes checked (a ConfigError names the wrong one)."""
    w1 = critic.w1.to(device=device, dtype=torch.float32).contiguous()
    hidden = w1.shape[0]
    if tuple(w1.shape) != (hidden, d):
        raise ConfigError(f"critic.w1 must be [H, d={d}], got {list(w1.shape)}")
    b1 = critic.b1.to(device=device, dtype=torch.float32).contiguous()
    if tuple(b1.shape) != (hidden,):
        raise ConfigError(
            f"critic.b1 must be [H={hidden}] (one row of the step table: pass "
            f"stack.row(r)), got {list(b1.shape)}"
        )
    w2 = critic.w2.to(device=device, dtype=torch.float32).contiguous()
    if tuple(w2.shape) != (hidden,):
        raise ConfigError(f"critic.w2 must be [H={hidden}], got {list(w2.shape)}")
    b2 = critic.b2.to(device=device, dtype=torch.float32).reshape(())
    return w1, b1, w2, b2
