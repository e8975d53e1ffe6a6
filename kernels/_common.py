"""Tables and checks shared by the Triton kernels (no triton import here)."""

from __future__ import annotations

import torch

from fastdia.errors import ConfigError

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
