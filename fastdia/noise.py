"""Counter-based Gaussian noise that matches Triton's ``tl.randn4x`` on any device.

The fastdia noise convention
----------------------------
The Gaussian for element ``k`` (the row-major flat index into a contiguous tensor,
``0 <= k < 2**31``) of step ``step`` under user seed ``seed`` is lane ``k % 4`` of::

    tl.randn4x(key, k // 4)    with the 64-bit Triton seed  key = (seed << 32) | step

so one Philox draw serves four consecutive elements (a *group*): the Philox key words are
``k0 = step`` (low 32 bits) and ``k1 = seed`` (high 32 bits), and the counter is
``(c0, c1, c2, c3) = (k // 4, 0, 0, 0)`` (Triton's int32-offset path). Both ``seed`` and
``step`` must lie in ``[0, 2**31)``. Step 0 draws the initial noise ``z_T``; sampler row
``r`` draws with step ``r + 1`` (the sampler applies that shift).

**Rows.** The fused ops number a batch's noise *per row* (a sequence of the guided step, a
query of ``sample_vocab``): row ``b`` draws under its own seed ``seed_b`` with ``k`` its
element index *within the row*, so a row's noise does not depend on what else shares the
batch (:func:`randn_rows`, :func:`gumbel_rows`). One seed ``s`` for a batch means the row
seeds ``(s + b) mod 2**31`` (:func:`row_seeds`); a batch of one row draws exactly the
flat stream above.

Because the stream is a pure function of ``(seed, step, k)``, a fused Triton kernel that calls
``tl.randn4x(key, k // 4)`` (``kernels/randn.py`` has the tile helpers), the CUDA header
``csrc/philox.cuh`` and this PyTorch reference produce the same noise: the Philox4x32-10
integers are bit-identical, and the floats (uniform map plus Box-Muller in fp32) agree to
float rounding of ``log``/``sqrt``/``cos``/``sin`` (about 1e-6).

Algorithm (a transcription of ``triton/language/random.py``):

* Philox4x32 with 10 rounds, multipliers ``0xD2511F53``/``0xCD9E8D57`` and key increments
  ``0x9E3779B9``/``0xBB67AE85``;
* each of the four output words ``i1..i4`` is bitcast to int32, negatives map to ``-x - 1``
  and the result is scaled by ``4.6566127342e-10`` (fp32) to give ``u1..u4`` in ``[0, 1)``;
* ``u1`` and ``u3`` are clamped to ``>= 1e-7``; lanes 0 and 1 are ``r cos(2 pi u2)`` and
  ``r sin(2 pi u2)`` with ``r = sqrt(-2 log u1)``, lanes 2 and 3 the same of ``(u3, u4)``.

The integer arithmetic runs on int64 tensors that hold uint32 values; 32x32-bit products
are split into 16-bit halves so nothing overflows int64.

This module imports only ``torch`` and the standard library.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from fastdia.errors import ConfigError

__all__ = [
    "GROUP",
    "MAX_INDEX",
    "MAX_SEED",
    "MAX_STEP",
    "gumbel",
    "gumbel_at",
    "gumbel_rows",
    "philox_randint4x",
    "randn",
    "randn_at",
    "randn_like",
    "randn_like_shape",
    "randn_rows",
    "row_seeds",
    "triton_key",
]

logger = logging.getLogger(__name__)

MAX_SEED = 2**31  # exclusive upper bound of the user seed
MAX_STEP = 2**31  # exclusive upper bound of the step
MAX_INDEX = 2**31  # exclusive upper bound of element indices (Triton int32 offsets)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10

_UNIFORM_SCALE = 4.6566127342e-10  # Triton's int32 -> [0, 1) scale
_TWO_PI = 6.283185307179586
_U1_MIN = 1.0e-7
GROUP = 4  # consecutive elements served by one Philox draw (tl.randn4x)


def _check_int(name: str, value: int, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be an int in [0, {upper}) (0 <= {name} < 2**31), "
            f"got {value!r} of type {type(value).__name__}"
        )
    if not 0 <= value < upper:
        raise ConfigError(f"{name}={value} is out of range: it must satisfy 0 <= {name} < 2**31")


def triton_key(seed: int, step: int) -> int:
    """Return the 64-bit Triton seed ``(seed << 32) | step`` after validating both values.

    Raises :class:`fastdia.errors.ConfigError` unless ``0 <= seed < 2**31`` and
    ``0 <= step < 2**31``.
    """
    _check_int("seed", seed, MAX_SEED)
    _check_int("step", step, MAX_STEP)
    return (seed << 32) | step


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` for a uint32 constant ``a``.

    ``x``: int64 tensor holding uint32 values. Both results are int64 tensors of uint32 values.
    The product is split as ``a * x = (a * x_hi) << 16 + a * x_lo`` with 16-bit halves of ``x``,
    so every intermediate stays below ``2**49``.
    """
    # In-place ops keep the temporaries down to four per call (this is the hot loop).
    p_hi = (x >> 16).mul_(a)  # < 2**48
    p_lo = (x & _MASK16).mul_(a)  # < 2**48
    hi = (p_lo >> 16).add_(p_hi).bitwise_right_shift_(16)
    lo = p_hi.bitwise_and_(_MASK16).bitwise_left_shift_(16).add_(p_lo).bitwise_and_(_MASK32)
    return hi, lo


def _philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int | torch.Tensor,
    k1: int | torch.Tensor,
    n_rounds: int = _N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 (``n_rounds`` rounds, 10 by default) exactly as Triton's ``philox_impl``.

    ``c0..c3``: int64 tensors of one shape (broadcastable), holding uint32 values.
    ``k0, k1``: Python ints in ``[0, 2**32)``, or 0-d int64 tensors on the counters' device
    (the key read from device memory: nothing is read back to the host, the caller's
    tensors are not modified). Returns four int64 tensors of uint32 values.
    """
    k0 = k0 & _MASK32
    k1 = k1 & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint4x(
    k0: int, k1: int, counters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on counters ``(c0, 0, 0, 0)`` with key ``(k0, k1)``.

    Matches ``tl.randint4x(key, counters)`` for int32 offsets with
    ``key = (k1 << 32) | k0``.

    Args:
        k0: low key word, in ``[0, 2**32)``.
        k1: high key word, in ``[0, 2**32)``.
        counters: integer tensor of any shape with values in ``[0, 2**32)`` (converted to int64).

    Returns:
        Four int64 tensors of ``counters.shape`` holding the uint32 output words.
    """
    for name, value in (("k0", k0), ("k1", k1)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MASK32:
            raise ConfigError(f"{name}={value!r} is out of range: it must be an int in [0, 2**32)")
    if counters.is_floating_point() or counters.is_complex():
        raise ConfigError(f"counters must be an integer tensor, got dtype {counters.dtype}")
    c0 = counters.to(torch.int64) & _MASK32
    zero = torch.zeros_like(c0)
    return _philox4x32(c0, zero, zero, zero, k0, k1)


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words (int64 tensor) -> fp32 in [0, 1)."""
    # Bitcast to int32 s; s < 0 (x >= 2**31) maps to -s - 1 = 2**32 - 1 - x. Result in [0, 2**31).
    folded = torch.where(x >= 2**31, _MASK32 - x, x)
    # a Python scalar is applied in the tensor's fp32 (the same product as an fp32 0-d
    # tensor) and creates no tensor: graph-safe (docs/design.md §2)
    return folded.to(torch.float32).mul_(_UNIFORM_SCALE)


def randn(
    seed: int,
    step: int,
    numel: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals for element indices ``offset .. offset + numel - 1``.

    Element ``i`` of the result is lane ``(offset + i) % 4`` of
    ``tl.randn4x((seed << 32) | step, (offset + i) // 4)`` (see the module docstring).

    Args:
        seed: user seed, ``0 <= seed < 2**31``.
        step: noise step, ``0 <= step < 2**31`` (0 for ``z_T``, ``r + 1`` for sampler row ``r``).
        numel: number of values, ``>= 0``; ``offset + numel <= 2**31``.
        offset: first element index, ``>= 0``.
        device: where to compute and return the tensor (default: CPU).
        dtype: floating dtype of the result; values are computed in fp32 and then cast.

    Returns:
        1-D tensor of shape ``(numel,)`` and dtype ``dtype`` on ``device``.

    Raises:
        ConfigError: a value is out of range.
    """
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating dtype, got {dtype}")
    logger.debug("randn seed=%d step=%d numel=%d offset=%d", seed, step, numel, offset)
    key = _checked_key(seed, step, numel, offset)
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    first, last = offset // GROUP, (offset + numel - 1) // GROUP
    groups = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    lane = offset % GROUP
    normals = _group_normals(key & _MASK32, key >> 32, groups).view(-1)
    return normals[lane : lane + numel].to(dtype)


def _key_word(name: str, value: int | torch.Tensor, device: torch.device) -> int | torch.Tensor:
    """A Philox key word: a checked Python int, or a 1-element integer tensor on ``device``
    as a 0-d int64 tensor (its range is the caller's responsibility: checking it would read
    it back to the host)."""
    if not isinstance(value, torch.Tensor):
        _check_int(name, value, MAX_SEED)
        return value
    if value.numel() != 1 or value.is_floating_point() or value.is_complex():
        raise ConfigError(
            f"{name} must be an int or a 1-element integer tensor, got {value.dtype} "
            f"of shape {list(value.shape)}"
        )
    if value.device != device:
        raise ConfigError(f"{name} is on {value.device} but the indices are on {device}")
    return value.reshape(()).to(torch.int64)


def row_seeds(
    seed: int | torch.Tensor, rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The per-row seeds of a batch of ``rows`` rows: ``[rows]`` int64 on ``device``.

    ``seed`` is one seed (an int in ``[0, 2**31)`` or a 1-element integer tensor): row
    ``b`` takes ``(seed + b) mod 2**31``; or already a ``[rows]`` integer tensor of
    per-row seeds, returned as int64 (its range, ``[0, 2**31)``, is the caller's
    responsibility: checking it would read it back to the host).

    Graph-safe for a ``[rows]`` tensor (returned as it is when int64); a single seed makes
    a new tensor (do it once, outside a captured loop).
    """
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex():
            raise ConfigError(f"seed must be an integer tensor, got dtype {seed.dtype}")
        if seed.dim() == 1 and seed.shape[0] == rows:
            return seed if seed.dtype == torch.int64 else seed.to(torch.int64)
        if seed.numel() != 1:
            raise ConfigError(
                f"seed must be one seed or one per row ([{rows}]), got shape {list(seed.shape)}"
            )
        dev = seed.device if device is None else torch.device(device)
        ar = torch.arange(rows, dtype=torch.int64, device=dev)
        return (seed.reshape(()).to(device=dev, dtype=torch.int64) + ar) % MAX_SEED
    _check_int("seed", seed, MAX_SEED)
    return (torch.arange(rows, dtype=torch.int64, device=device) + seed) % MAX_SEED


def _row_key(seeds: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """Per-row seeds ``[rows]`` as the key word ``k1`` of shape ``[rows, 1]`` (int64)."""
    if seeds.shape != (rows,) or seeds.is_floating_point() or seeds.is_complex():
        raise ConfigError(
            f"seeds must be an integer tensor of shape [{rows}], got {seeds.dtype} "
            f"{list(seeds.shape)}"
        )
    if seeds.device != device:
        raise ConfigError(f"seeds are on {seeds.device} but the noise is drawn on {device}")
    return seeds.to(torch.int64).view(rows, 1)


def randn_rows(seeds: torch.Tensor, step: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Standard normals with ``like``'s shape ``[R, ...]`` and device (float32), row ``b``
    drawn under seed ``seeds[b]``: element ``k`` of row ``b``'s row-major flat order is
    ``randn(seeds[b], step, M)[k]``, ``M`` the elements of a row.

    Graph-safe like :func:`randn_like` (``seeds`` ``[R]`` and ``step`` device tensors);
    ``M <= 2**31``.
    """
    rows = like.shape[0]
    per_row = like[0].numel() if rows else 0
    if per_row > MAX_INDEX:
        raise ConfigError(f"{per_row} elements per row: element indices must be < 2**31")
    device = like.device
    k1 = _row_key(seeds, rows, device)
    k0 = _key_word("step", step, device)
    flat = like.reshape(rows, -1)
    groups = torch.ones_like(flat[:, ::GROUP], dtype=torch.int64).cumsum_(1).sub_(1)
    normals = _group_normals(k0, k1, groups).view(rows, -1)
    return normals[:, :per_row].reshape(like.shape)


def gumbel_rows(seeds: torch.Tensor, step: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel variables ``[R, V]``: row ``b``, element ``index[v]`` under seed
    ``seeds[b]`` (``gumbel(seeds[b], step, n)[index[v]]``), float32 on ``index``'s device.

    ``index``: ``[V]`` integer element indices (typically ``0 .. V - 1``, made once).
    Graph-safe with ``seeds`` ``[R]`` and ``step`` as device tensors.
    """
    if index.dim() != 1 or index.is_floating_point() or index.is_complex():
        raise ConfigError(f"index must be a 1-D integer tensor, got {index.dtype} {index.shape}")
    rows = seeds.shape[0] if seeds.dim() == 1 else -1
    k1 = _row_key(seeds, rows, index.device)
    k0 = _key_word("step", step, index.device)
    return _gumbel_counters(k0, k1, index.to(torch.int64)[None, :].expand(rows, -1))


def _indexed_key(
    seed: int | torch.Tensor, step: int | torch.Tensor, index: torch.Tensor
) -> tuple[int | torch.Tensor, int | torch.Tensor, torch.Tensor]:
    """The key words ``(k0, k1)`` of ``(seed, step)`` on ``index``'s device, and ``index``
    as int64 (it must be an integer tensor)."""
    if index.is_floating_point() or index.is_complex():
        raise ConfigError(f"index must be an integer tensor, got dtype {index.dtype}")
    k1 = _key_word("seed", seed, index.device)
    k0 = _key_word("step", step, index.device)
    return k0, k1, index.to(torch.int64)


def randn_at(
    seed: int | torch.Tensor, step: int | torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Standard normals at arbitrary element indices (float32, ``index``'s shape and device).

    ``randn_at(seed, step, index)[i] == randn(seed, step, n)[index[i]]``; use it to draw
    the noise of a few scattered elements without drawing the whole tensor.

    Args:
        seed, step: as in :func:`randn`, or 1-element integer tensors on ``index``'s
            device, read there (no host sync; their range is then the caller's
            responsibility). The Philox integers are the same either way.
        index: integer tensor of element indices in ``[0, 2**31)``.
    """
    return _element_normals(*_indexed_key(seed, step, index))


def randn_like(
    seed: int | torch.Tensor, step: int | torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """Standard normals with ``like``'s shape and device (float32), element ``k`` of the
    row-major flat order drawn at index ``k``: ``randn(seed, step, like.numel())`` reshaped.

    Graph-safe (docs/design.md §2): with ``seed`` and ``step`` as device tensors (as in
    :func:`randn_at`) nothing is created from host values and nothing is read back; the
    group counters come from a cumulative sum over ``like``'s shape, not from ``arange``.
    ``like.numel()`` must be ``<= 2**31``.
    """
    if like.numel() > MAX_INDEX:
        raise ConfigError(f"{like.numel()} elements: element indices must be < 2**31")
    device = like.device
    k1 = _key_word("seed", seed, device)
    k0 = _key_word("step", step, device)
    # one counter per group of four: ceil(numel / 4) of them
    groups = torch.ones_like(like.reshape(-1)[::GROUP], dtype=torch.int64).cumsum_(0).sub_(1)
    normals = _group_normals(k0, k1, groups).view(-1)
    return normals[: like.numel()].view(like.shape)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor, *, sine: torch.Tensor | bool) -> torch.Tensor:
    """Triton's ``pair_uniform_to_normal`` (fp32): ``r cos(th)``, or ``r sin(th)`` where
    ``sine`` holds, with ``r = sqrt(-2 log max(u1, 1e-7))`` and ``th = 2 pi u2``.
    Modifies ``u1`` and ``u2``."""
    r = torch.sqrt(torch.log(u1.clamp_(min=_U1_MIN)).mul_(-2.0))
    theta = u2.mul_(_TWO_PI)
    if isinstance(sine, bool):
        return r.mul_(torch.sin(theta) if sine else torch.cos(theta))
    return r.mul_(torch.where(sine, torch.sin(theta), torch.cos(theta)))


def _group_normals(
    k0: int | torch.Tensor, k1: int | torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """fp32 ``tl.randn4x(key, groups)`` stacked on a new last dim of size 4 (the lanes),
    with ``key = (k1 << 32) | k0``: ``[*groups.shape, 4]``."""
    zero = torch.zeros_like(groups)
    i1, i2, i3, i4 = (_uint32_to_uniform(w) for w in _philox4x32(groups, zero, zero, zero, k0, k1))
    lanes = (
        _box_muller(i1.clone(), i2.clone(), sine=False),
        _box_muller(i1, i2, sine=True),
        _box_muller(i3.clone(), i4.clone(), sine=False),
        _box_muller(i3, i4, sine=True),
    )
    return torch.stack(lanes, dim=-1)


def _element_normals(
    k0: int | torch.Tensor, k1: int | torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """fp32 Gaussians of arbitrary element indices (``index``'s shape): lane ``index % 4``
    of ``tl.randn4x(key, index // 4)``, one Box-Muller per element."""
    zero = torch.zeros_like(index)
    i1, i2, i3, i4 = _philox4x32(index >> 2, zero, zero, zero, k0, k1)
    lane = index & 3
    upper = lane >= 2
    u1 = _uint32_to_uniform(torch.where(upper, i3, i1))
    u2 = _uint32_to_uniform(torch.where(upper, i4, i2))
    return _box_muller(u1, u2, sine=(lane & 1).bool())


def _checked_key(seed: int, step: int, numel: int, offset: int) -> int:
    """The Triton key of ``(seed, step)`` after checking that elements ``offset ..
    offset + numel - 1`` are valid indices."""
    key = triton_key(seed, step)
    _check_int("numel", numel, MAX_INDEX + 1)
    _check_int("offset", offset, MAX_INDEX)
    if offset + numel > MAX_INDEX:
        raise ConfigError(
            f"offset + numel = {offset + numel} exceeds 2**31: element indices must be < 2**31"
        )
    return key


def _key_and_counters(
    seed: int, step: int, numel: int, offset: int, device: torch.device | str | None
) -> tuple[int, torch.Tensor]:
    """The checked Triton key and the int64 counters ``offset .. offset + numel - 1``."""
    key = _checked_key(seed, step, numel, offset)
    return key, torch.arange(offset, offset + numel, dtype=torch.int64, device=device)


GUMBEL_U_MIN = 1.0e-7  # clamp of the uniform of a Gumbel draw (no -log(0))
GUMBEL_U_MAX = 0.99999994  # 1 - 2**-24, the largest fp32 below 1 (no log(1) = 0)


def gumbel(
    seed: int, step: int, numel: int, *, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard Gumbel variables for element indices ``offset .. offset + numel - 1``.

    Element ``k`` is ``-log(-log(u))`` with ``u = tl.rand((seed << 32) | step, k)`` (the
    first Philox word mapped to ``[0, 1)`` as Triton does) clamped to
    ``[GUMBEL_U_MIN, GUMBEL_U_MAX]``; fp32, shape ``(numel,)``. A fused kernel computes
    the same numbers with ``tl.rand`` and the same clamp.
    """
    key, counters = _key_and_counters(seed, step, numel, offset, device)
    return _gumbel_counters(key & _MASK32, key >> 32, counters)


def gumbel_at(
    seed: int | torch.Tensor, step: int | torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Standard Gumbel variables at element indices ``index`` (any shape, float32 on its
    device): ``gumbel_at(seed, step, index)[i] == gumbel(seed, step, n)[index[i]]``.

    ``seed`` and ``step`` as in :func:`randn_at`: ints, or 1-element integer tensors on
    ``index``'s device read there (no host sync).
    """
    return _gumbel_counters(*_indexed_key(seed, step, index))


def _gumbel_counters(
    k0: int | torch.Tensor, k1: int | torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    zero = torch.zeros_like(counters)
    i1, _, _, _ = _philox4x32(counters, zero, zero, zero, k0, k1)
    u = _uint32_to_uniform(i1).clamp_(GUMBEL_U_MIN, GUMBEL_U_MAX)
    return torch.log(u).neg_().log_().neg_()


def randn_like_shape(
    seed: int,
    step: int,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals of ``shape``; element with row-major flat index ``k`` uses index ``k``.

    Equivalent to ``randn(seed, step, prod(shape), device=device, dtype=dtype).reshape(shape)``.

    Returns:
        Contiguous tensor of shape ``tuple(shape)`` and dtype ``dtype`` on ``device``.
    """
    dims = tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    numel = math.prod(dims)
    return randn(seed, step, numel, device=device, dtype=dtype).reshape(dims)
