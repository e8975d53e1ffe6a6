"""The ``cuda`` variants of the fused ops: CUDA C++ kernels from ``csrc/``.

Same call signatures and semantics as the references
(:func:`fastdia.ops.guided_step_ref.guided_step_reference`,
:func:`fastdia.ops.round_to_vocab_ref.round_to_vocab_reference`) and the Triton variants,
plus optional output buffers. The extension is loaded (prebuilt, or built just in time:
:mod:`fastdia.ops.cuda_build`) on the first call, never at import; the fake (meta)
implementations that ``torch.compile`` traces with are registered right after loading.
Warm up once eagerly before ``torch.compile`` or CUDA-graph capture (the first call may
build the extension).

Ops (``torch.ops.fastdia_cuda``):

* ``guided_step`` / ``guided_step_out``: one kernel pass. Without a critic an elementwise
  kernel; with one, 64-token tiles whose critic matmuls run on the tensor cores as 3xTF32
  (fp32-level accuracy), Philox noise in registers (numbered as :mod:`fastdia.noise`), one
  block per sequence when ``noise_kappa > 0`` or ``h`` is asked for. ``seed``, ``step``,
  ``guidance`` and the coefficients are read on the device (graph-safe).
* ``round_to_vocab`` / ``round_to_vocab_out``: a tensor-core GEMM (WMMA; fp16/bf16 operands
  natively, fp32 operands as 3xTF32, fp32 accumulation) with a running (max, argmax) over
  128-entry vocabulary tiles, ties to the lowest id, no ``[N, V]`` buffer; the vocabulary
  is split across blocks for small ``N`` and merged by a second kernel.

Fallback: a critic stack wider than one block's shared memory allows (H = 768 hidden units
on an H100, 512 on an A100, 256 on the 99 KB sm_86/sm_89 parts; the default critic has
128) runs the PyTorch reference for that step instead, with a warning logged once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from fastdia.errors import ConfigError
from fastdia.noise import row_seeds
from fastdia.ops import cuda_build
from fastdia.ops.checks import (
    FLOAT_DTYPES,
    check_out_buffer,
    critic_weights,
    device_scalar,
    step_shape,
)
from fastdia.ops.guided_step_ref import TokenLocalStack, guided_step_reference

__all__ = ["guided_step", "load", "round_to_vocab"]

log = logging.getLogger(__name__)

_fakes_registered = False


def load() -> None:
    """Load the extension (building it if needed) and register its fake implementations.

    Raises:
        ConfigError: it cannot be loaded or built here (the message says what to install).
    """
    global _fakes_registered
    cuda_build.load_extension()
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True


def _ops() -> Any:
    """``torch.ops.fastdia_cuda``, loading the extension on first use."""
    if not _fakes_registered:
        load()
    return getattr(torch.ops, cuda_build.NAMESPACE)


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / FakeTensor tracing."""
    lib = cuda_build.NAMESPACE

    @torch.library.register_fake(f"{lib}::guided_step")
    def _guided_step_fake(
        z,
        eps,
        coef,
        seed,
        step,
        guidance,
        grad,
        w1,
        b1,
        w2,
        b2,
        seq_len,
        noise_kappa,
        return_h,
        d_groups=0,
    ):
        n, d = z.shape
        rows = n // seq_len if (return_h and w1 is not None) else 0
        return z.new_empty((n, d), dtype=torch.float32), z.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::guided_step_out")
    def _guided_step_out_fake(*args):
        return None

    @torch.library.register_fake(f"{lib}::round_to_vocab")
    def _round_fake(z, weight, bias, return_embeddings, num_splits):
        n, d = z.shape
        emb_shape = (n, d) if return_embeddings else (0, 0)
        return z.new_empty((n,), dtype=torch.int64), weight.new_empty(emb_shape)

    @torch.library.register_fake(f"{lib}::round_to_vocab_out")
    def _round_out_fake(*args):
        return None


# ---- guided_step ----------------------------------------------------------------------------


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The tensors' dtype when they share a supported one, else float32 (exact upcasts)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in FLOAT_DTYPES:
        return next(iter(dtypes))
    return torch.float32


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _critic_fits(hidden: int, device_index: int) -> bool:
    """Whether a critic of ``hidden`` units fits the shared memory of one block."""
    needed = int(_ops().guided_step_smem_bytes(hidden))
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if needed > limit:
        log.warning(
            "cuda guided_step: a critic stack of %d hidden units needs %d bytes of shared "
            "memory per block, more than the %d of this device: running the PyTorch "
            "reference for this step instead",
            hidden,
            needed,
            limit,
        )
    return needed <= limit


def guided_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    *,
    seq_len: int,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    guidance: float | torch.Tensor = 0.0,
    critic: TokenLocalStack | None = None,
    grad: torch.Tensor | None = None,
    noise_kappa: float = 0.0,
    return_h: bool = False,
    out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    d_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guided reverse step as one CUDA kernel pass.

    Args:
        z: ``[N, d]`` current state on a CUDA device, ``N = B * seq_len``; float32, float16
            or bfloat16 (upcast in registers). When ``z``, ``eps`` and ``grad`` do not share
            one of these dtypes they are cast to float32 first (exact).
        eps: ``[N, d]`` the denoiser's noise estimate.
        coef: ``[4]`` or ``[B, 4]`` ``(a, b, c, s)`` (cast to float32 on ``z``'s device).
        seq_len: tokens per sequence ``L``.
        seed: per-sequence seeds ``[B]`` int64 on ``z``'s device, or one seed ``s`` (an int
            in ``[0, 2**31)`` or a 1-element tensor: sequence ``b`` takes ``s + b``); read
            on the device, their range is then the caller's responsibility.
        step: the noise step, an int in ``[0, 2**31)`` or a 1-element integer tensor.
        guidance: ``lambda``, a number or a 1-element tensor.
        critic: token-local stack at one row (``b1 [H]``), or None.
        grad: ``[N, d]`` extra guidance gradient, or None.
        noise_kappa: adaptive noise strength ``kappa >= 0`` (used with a critic only).
        return_h: also return the stack's value per sequence.
        out: optional contiguous float32 ``[N, d]`` buffer for ``z'`` (every element written).
        h_out: optional float32 ``[B]`` buffer for ``h`` (with ``return_h`` and a critic).
        d_groups: column groups of the critic kernel (None: chosen from the grid and the
            device, more of them when there are few row tiles); for tests. Any count gives
            the same result.

    Returns:
        ``(z' [N, d] float32, h [B] float32 or None)``.

    Raises:
        ConfigError: bad shapes or dtypes, a seed or step out of range, ``N * d >= 2**31``,
            or the extension cannot be built here.
    """
    n, d, batch = step_shape(z, seq_len)
    kappa = float(noise_kappa)
    if not kappa >= 0.0:
        raise ConfigError(f"noise_kappa must be >= 0, got {noise_kappa!r}")
    device = z.device
    if device.type != "cuda":
        raise ConfigError(f"the cuda guided_step needs CUDA tensors, got z on {device}")
    for name, x in (("eps", eps), ("grad", grad)):
        if x is not None and (tuple(x.shape) != (n, d) or x.device != device):
            raise ConfigError(
                f"{name} must be [{n}, {d}] on {device}, got {list(x.shape)} on {x.device}"
            )
    dtype = _common_dtype([t for t in (z, eps, grad) if t is not None])
    z, eps = z.to(dtype).contiguous(), eps.to(dtype).contiguous()
    if grad is not None:
        grad = grad.to(dtype).contiguous()
    coef = coef.to(device=device, dtype=torch.float32).contiguous()
    if tuple(coef.shape) not in ((4,), (batch, 4)):
        raise ConfigError(f"coef must be [4] or [B={batch}, 4], got {list(coef.shape)}")
    seed_t = row_seeds(seed, batch, device)
    step_t = device_scalar(step, torch.int64, device, "step")
    lam_t = device_scalar(guidance, torch.float32, device, "guidance")

    w1 = b1 = w2 = b2 = None
    if critic is not None:
        w1, b1, w2, b2 = critic_weights(critic, d, device)
        hidden = w1.shape[0]
        # the width check runs eagerly (cached per width and device); under torch.compile
        # the kernel's own check stands (warm up eagerly first, as the module says)
        if not torch.compiler.is_compiling() and not _critic_fits(hidden, _index(device)):
            return _reference_step(
                z,
                eps,
                coef,
                seq_len,
                seed_t,
                step_t,
                lam_t,
                critic,
                grad,
                kappa,
                return_h,
                out,
                h_out,
            )
    want_h = critic is not None and return_h
    if d_groups is not None and (
        isinstance(d_groups, bool) or not isinstance(d_groups, int) or not 1 <= d_groups < 65536
    ):
        raise ConfigError(f"d_groups must be an int in [1, 65535] or None, got {d_groups!r}")

    ops = _ops()
    args = (z, eps, coef, seed_t, step_t, lam_t, grad, w1, b1, w2, b2, seq_len, kappa, want_h)
    args += (d_groups or 0,)
    if out is None and h_out is None:
        result, h = ops.guided_step(*args)
        return result, (h if want_h else None)
    if out is None:
        out = torch.empty((n, d), dtype=torch.float32, device=device)
    if want_h:
        h = torch.empty(batch, dtype=torch.float32, device=device) if h_out is None else h_out
    else:
        h = torch.empty(0, dtype=torch.float32, device=device)
    ops.guided_step_out(*args, out, h)
    return out, (h if want_h else None)


def _reference_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    coef: torch.Tensor,
    seq_len: int,
    seed: torch.Tensor,
    step: torch.Tensor,
    guidance: torch.Tensor,
    critic: TokenLocalStack,
    grad: torch.Tensor | None,
    kappa: float,
    return_h: bool,
    out: torch.Tensor | None,
    h_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The documented fallback for critics too wide for the kernel: the reference (which
    reads ``seed`` and ``step`` on the device too), written into the caller's buffers."""
    return guided_step_reference(
        z,
        eps,
        coef,
        seq_len=seq_len,
        seed=seed,
        step=step,
        guidance=guidance,
        critic=critic,
        grad=grad,
        noise_kappa=kappa,
        return_h=return_h,
        out=out,
        h_out=h_out,
    )


# ---- round_to_vocab -------------------------------------------------------------------------


def round_to_vocab(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    return_embeddings: bool = False,
    out: torch.Tensor | None = None,
    out_embeddings: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round ``z`` to token ids with the CUDA kernels (the ``[N, V]`` scores never reach
    memory).

    Args:
        z: ``[..., d]`` float32, float16 or bfloat16 on a CUDA device.
        weight: ``[V, d]`` the embedding matrix ``E``, float32, float16 or bfloat16. Equal
            16-bit dtypes run natively; a float32 operand makes the products 3xTF32
            (fp32-level); a 16-bit ``z`` with a different ``weight`` dtype is upcast first.
        bias: ``[V]`` (any float dtype, used as float32) or None.
        return_embeddings: also return ``weight[ids]`` ``[..., d]`` in ``weight``'s dtype
            (a bit-exact gather).
        out: optional int64 buffer of ``z.shape[:-1]`` for the ids (every element written).
        out_embeddings: optional contiguous buffer ``[..., d]`` of ``weight``'s dtype.
        num_splits: vocabulary slices (None: chosen from ``N`` and the device); for tests.

    Returns:
        ``ids [...]`` int64 (ties to the lowest id), and with ``return_embeddings`` also
        ``weight[ids]``.

    Raises:
        ConfigError: shapes or devices disagree, an unsupported dtype, a bad buffer, or the
            extension cannot be built here.
    """
    if weight.dim() != 2 or z.dim() < 1 or z.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"need z [..., d] and weight [V, d], got {list(z.shape)} and {list(weight.shape)}"
        )
    for name, x in (("z", z), ("weight", weight)):
        if x.dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{name} has dtype {x.dtype}; the cuda round_to_vocab takes float32, float16 "
                f"or bfloat16: cast it first (e.g. {name}.float())"
            )
    device = z.device
    if device.type != "cuda" or weight.device != device:
        raise ConfigError(
            f"the cuda round_to_vocab needs z and weight on one CUDA device, got "
            f"{device} and {weight.device}"
        )
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ConfigError(f"num_splits must be a positive int or None, got {num_splits!r}")
    v, d = weight.shape
    if v == 0:
        raise ConfigError("weight has no rows: the vocabulary is empty")
    lead = z.shape[:-1]
    if z.dtype != weight.dtype and z.dtype != torch.float32:
        z = z.float()
    flat = z.reshape(-1, d).contiguous()
    weight = weight.contiguous()
    n = flat.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (v,):
            raise ConfigError(f"bias must be [V={v}], got {list(bias.shape)}")
        bias = bias.to(device=device, dtype=torch.float32).contiguous()
    if out is not None:
        check_out_buffer(out, tuple(lead), torch.int64, device, "out")
    emb_shape = (*lead, d)
    if out_embeddings is not None:
        if not return_embeddings:
            raise ConfigError("out_embeddings needs return_embeddings=True")
        check_out_buffer(out_embeddings, emb_shape, weight.dtype, device, "out_embeddings")
    if n == 0:
        ids = out if out is not None else torch.empty(lead, dtype=torch.int64, device=device)
        if not return_embeddings:
            return ids
        emb = out_embeddings if out_embeddings is not None else weight.new_empty(emb_shape)
        return ids, emb

    ops = _ops()
    splits = num_splits or 0
    if out is None and out_embeddings is None:
        ids, emb = ops.round_to_vocab(flat, weight, bias, return_embeddings, splits)
        ids = ids.view(lead)
        return (ids, emb.view(emb_shape)) if return_embeddings else ids
    ids = out if out is not None else torch.empty(lead, dtype=torch.int64, device=device)
    if return_embeddings:
        emb = out_embeddings if out_embeddings is not None else weight.new_empty(emb_shape)
    else:
        emb = weight.new_empty((0, 0))
    ops.round_to_vocab_out(
        flat,
        weight,
        bias,
        return_embeddings,
        splits,
        ids.view(-1),
        emb.view(-1, d) if return_embeddings else emb,
    )
    return (ids, emb) if return_embeddings else ids
