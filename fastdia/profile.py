"""Op profiles: every variant of every fused op on a grid of shapes, against the device's
measured ceilings (``fastdia profile``).

For each op x variant x shape this measures the median time and turns it into achieved
bandwidth (bytes the op must move, over the time) and achieved FLOP rate, each as a
fraction of what the device itself was measured to do in the same run: a large
device-to-device copy (bandwidth) and a large matmul (bf16 on a GPU, float32 on the CPU).
``fraction_of_roofline`` is the time the better of the two ceilings allows, over the time
taken (1.0 is the roofline).

Timing: on CUDA, ``triton.testing.do_bench`` medians (it flushes L2 before every call) with
the inputs rotated through enough copies to exceed twice the L2 cache, so no call finds its
inputs in cache from the previous one (``E`` of ``round_to_vocab`` is larger than L2 by
itself and is not copied); on the CPU, a ``time.perf_counter`` median over repeats after a
warm-up. Triton variants run on the CPU only in the interpreter, which times Python, not
the kernel: they are left out there unless named.

Byte and FLOP counts (float32 operands, docs/design.md §5):

* ``guided_step``: reads ``z``, ``eps`` and writes ``z'`` (``12 N d`` bytes) plus the
  critic (``4 (H d + 2 H)``); ``4 N H d`` FLOPs (two ``[N, d] x [d, H]`` matmuls).
* ``round_to_vocab``: reads ``E`` and ``z`` (``es (V d + N d)``), the bias (``4 V``) and
  writes the ids (``8 N``); ``2 N d V`` FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastdia import ops
from fastdia.errors import ConfigError
from fastdia.ops import registry
from fastdia.provenance import environment
from fastdia.timing import bench_ms, copies_past_l2, measure_ceilings, peak_extra_bytes

log = logging.getLogger(__name__)

__all__ = [
    "Case",
    "default_cases",
    "default_variants",
    "format_table",
    "make_op_call",
    "profile",
]

PROFILED_OPS = (ops.GUIDED_STEP, ops.ROUND_TO_VOCAB)


# ---- cases ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of one op.

    Attributes:
        op: ``"guided_step"`` or ``"round_to_vocab"``.
        tokens: ``N`` rows.
        dim: ``d``.
        hidden: ``H`` of the critic stack (guided_step).
        vocab: ``V`` (round_to_vocab).
        seq_len: ``L`` (guided_step; ``N`` is a multiple of it).
        dtype: operand dtype name (``"float32"``: the sampler's).
    """

    op: str
    tokens: int
    dim: int
    hidden: int = 0
    vocab: int = 0
    seq_len: int = 1
    dtype: str = "float32"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def bytes_moved(self) -> int:
        """The bytes the op must move at least (see the module docstring)."""
        n, d = self.tokens, self.dim
        if self.op == ops.GUIDED_STEP:
            return 12 * n * d + 4 * (self.hidden * d + 2 * self.hidden)
        es = self.element_size
        return es * (self.vocab * d + n * d) + 4 * self.vocab + 8 * n

    def flops(self) -> int:
        if self.op == ops.GUIDED_STEP:
            return 4 * self.tokens * self.hidden * self.dim
        return 2 * self.tokens * self.dim * self.vocab

    def label(self) -> str:
        if self.op == ops.GUIDED_STEP:
            return f"N={self.tokens} d={self.dim} H={self.hidden} L={self.seq_len}"
        return f"N={self.tokens} d={self.dim} V={self.vocab} {self.dtype}"


GUIDED_STEP_TOKENS = (64, 1024, 8192)
ROUND_TO_VOCAB_TOKENS = (64, 1024, 4096, 8192)
QUICK_GUIDED_STEP_TOKENS = (64, 1024)
QUICK_ROUND_TO_VOCAB_TOKENS = (16, 64)
DIM, VOCAB, HIDDEN, SEQ_LEN = 576, 49152, 128, 32  # SmolLM2-135M, a default-width critic


def default_cases(
    *,
    quick: bool = False,
    guided_step_tokens: Sequence[int] | None = None,
    round_to_vocab_tokens: Sequence[int] | None = None,
    dim: int = DIM,
    vocab: int = VOCAB,
    hidden: int = HIDDEN,
    seq_len: int = SEQ_LEN,
    dtypes: Sequence[str] = ("float32",),
) -> list[Case]:
    """The profile grid: ``guided_step`` N in {64, 1024, 8192} x d 576 with an H = 128
    critic, ``round_to_vocab`` N in {64, 1024, 4096, 8192} x (d 576, V 49152); ``quick``:
    N in {64, 1024} and {16, 64}. ``N`` smaller than ``seq_len`` uses ``L = N``."""
    gs = guided_step_tokens or (QUICK_GUIDED_STEP_TOKENS if quick else GUIDED_STEP_TOKENS)
    rv = round_to_vocab_tokens or (QUICK_ROUND_TO_VOCAB_TOKENS if quick else ROUND_TO_VOCAB_TOKENS)
    for name in dtypes:
        if name not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    cases = []
    for n in gs:
        length = math.gcd(n, seq_len) if n >= 1 else 1
        cases.append(Case(ops.GUIDED_STEP, n, dim, hidden=hidden, seq_len=length))
    cases += [Case(ops.ROUND_TO_VOCAB, n, dim, vocab=vocab, dtype=t) for t in dtypes for n in rv]
    return cases


def default_variants(op: str, device: torch.device | str) -> list[str]:
    """Every registered variant of ``op`` that runs on ``device``; on the CPU, without the
    Triton interpreter (it times Python, not a kernel)."""
    device = torch.device(device)
    names = []
    for name in registry.backends(op):
        try:
            registry.resolve_backend(name, op, device)
        except ConfigError:
            continue
        if device.type == "cpu" and name == "triton":
            continue
        names.append(name)
    return names


def _guided_step_call(case: Case, device: torch.device, copies: int) -> Callable[[str], Any]:
    from fastdia.ops.guided_step_ref import TokenLocalStack

    gen = torch.Generator(device=device).manual_seed(case.tokens)
    n, d, h = case.tokens, case.dim, case.hidden
    zs = [torch.randn(n, d, generator=gen, device=device) for _ in range(copies)]
    epss = [torch.randn(n, d, generator=gen, device=device) for _ in range(copies)]
    stack = TokenLocalStack(
        w1=torch.randn(h, d, generator=gen, device=device) / d**0.5,
        b1=torch.randn(h, generator=gen, device=device),
        w2=torch.randn(h, generator=gen, device=device) / h**0.5,
        b2=torch.randn((), generator=gen, device=device),
    )
    coef = torch.tensor([1.0, -0.2, 0.3, 0.5], device=device)
    lam = torch.tensor(2.0, device=device)
    step = torch.tensor(5, device=device)
    seed = torch.tensor(3, device=device)

    def make(variant: str) -> Callable[[int], Any]:
        fn = registry.get(ops.GUIDED_STEP, variant)
        kw = {"seq_len": case.seq_len, "seed": seed, "step": step, "guidance": lam}
        if variant == "reference":  # it reads the counters on the host: give it ints
            kw.update(seed=3, step=5)
        return lambda i: fn(zs[i], epss[i], coef, critic=stack, **kw)

    return make


def _round_to_vocab_call(case: Case, device: torch.device, copies: int) -> Callable[[str], Any]:
    gen = torch.Generator(device=device).manual_seed(case.tokens)
    dtype = getattr(torch, case.dtype)
    weight = torch.randn(case.vocab, case.dim, generator=gen, device=device).to(dtype)
    bias = -0.5 * weight.float().pow(2).sum(-1)
    zs = [
        torch.randn(case.tokens, case.dim, generator=gen, device=device).to(dtype)
        for _ in range(copies)
    ]

    def make(variant: str) -> Callable[[int], Any]:
        fn = registry.get(ops.ROUND_TO_VOCAB, variant)
        return lambda i: fn(zs[i], weight, bias)

    return make


def make_op_call(
    case: Case, device: torch.device | str, copies: int = 1
) -> Callable[[str], Callable[[int], Any]]:
    """Random inputs for ``case`` on ``device`` (``copies`` of the per-call inputs; ``E`` and
    the critic are shared), and ``make(variant)``: a function ``call(i)`` running that
    variant on copy ``i``. ``guided_step`` gets an H-wide critic stack, the counters and
    the guidance (device tensors, ints for the reference); ``round_to_vocab`` the L2
    rounding bias ``-||E_v||^2 / 2``."""
    device = torch.device(device)
    builder = _guided_step_call if case.op == ops.GUIDED_STEP else _round_to_vocab_call
    return builder(case, device, copies)


def _rotating_bytes(case: Case) -> int:
    """Bytes of the inputs that are copied for rotation (``E`` is not)."""
    if case.op == ops.GUIDED_STEP:
        return 8 * case.tokens * case.dim
    return case.element_size * case.tokens * case.dim


def profile_case(
    case: Case,
    variants: Sequence[str],
    device: torch.device | str,
    ceilings: dict[str, Any],
    *,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """One row per variant of ``case``: time, achieved rates and fractions of the ceilings.

    A variant that fails records its error instead of a time (the profile goes on).
    """
    device = torch.device(device)
    copies = copies_past_l2(_rotating_bytes(case), device)
    make = make_op_call(case, device, copies)
    nbytes, flops = case.bytes_moved(), case.flops()
    floor_s = max(
        nbytes / (ceilings["bandwidth_gb_per_s"] * 1e9),
        flops / (ceilings["matmul_tflop_per_s"] * 1e12),
    )
    rows = []
    for variant in variants:
        row: dict[str, Any] = {
            **dataclasses.asdict(case),
            "shape": case.label(),
            "variant": variant,
            "bytes": nbytes,
            "flops": flops,
            "copies": copies,
            "repeats": repeats,
            "bound": "memory"
            if nbytes / (ceilings["bandwidth_gb_per_s"] * 1e9)
            >= flops / (ceilings["matmul_tflop_per_s"] * 1e12)
            else "compute",
        }
        try:
            call = make(variant)
            ms = bench_ms(call, device, copies=copies, repeats=repeats)
            row["peak_extra_bytes"] = peak_extra_bytes(functools.partial(call, 0), device)
        except Exception as exc:  # a variant that fails must not stop the profile
            log.warning("%s %s %s failed: %s", case.op, variant, case.label(), exc, exc_info=True)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
            continue
        seconds = ms * 1e-3
        gbs = nbytes / seconds / 1e9
        tflops = flops / seconds / 1e12
        row.update(
            {
                "ms": ms,
                "gb_per_s": gbs,
                "tflop_per_s": tflops,
                "fraction_of_bandwidth": gbs / ceilings["bandwidth_gb_per_s"],
                "fraction_of_matmul": tflops / ceilings["matmul_tflop_per_s"],
                "fraction_of_roofline": floor_s / seconds,
            }
        )
        log.info(
            "%s %s %s: %.4f ms, %.1f GB/s, %.3f TFLOP/s",
            case.op,
            variant,
            case.label(),
            ms,
            gbs,
            tflops,
        )
        rows.append(row)
    return rows


def profile(
    device: torch.device | str,
    cases: Sequence[Case],
    *,
    variants: Sequence[str] | None = None,
    repeats: int = 10,
    quick_ceilings: bool = False,
) -> dict[str, Any]:
    """Measure the ceilings, then every case x variant.

    Args:
        device: where to run.
        cases: the shapes (:func:`default_cases`).
        variants: variant names to run where registered and available (None: every
            available one, :func:`default_variants`).
        repeats: timed calls per row on the CPU.
        quick_ceilings: smaller ceiling measurements (CPU).

    Returns:
        ``{"environment", "ceilings", "rows"}``, JSON-serialisable.
    """
    device = torch.device(device)
    env = environment(device)
    ceilings = measure_ceilings(device, quick=quick_ceilings)
    rows = []
    with torch.no_grad():
        for case in cases:
            names = default_variants(case.op, device)
            if variants is not None:
                names = [v for v in variants if v in registry.backends(case.op)]
                for name in names:
                    registry.resolve_backend(name, case.op, device)  # fails with the reason
            rows += profile_case(case, names, device, ceilings, repeats=repeats)
    return {"environment": env, "ceilings": ceilings, "rows": rows}


def format_table(payload: dict[str, Any]) -> str:
    """The profile as a fixed-width text table (one line per op x variant x shape)."""
    ceil = payload["ceilings"]
    env = payload["environment"]
    head = (
        f"device {env['device']} ({env.get('cpu', '')}), torch {env['torch']}, "
        f"triton {env.get('triton')}, git {env['git_sha']}\n"
        f"ceilings: copy {ceil['bandwidth_gb_per_s']:.1f} GB/s, "
        f"{ceil['matmul_dtype']} matmul {ceil['matmul_tflop_per_s']:.3f} TFLOP/s\n"
    )
    cols = (
        f"{'op':<15}{'variant':<11}{'shape':<34}{'ms':>10}{'GB/s':>9}{'%BW':>7}"
        f"{'TFLOP/s':>9}{'%MM':>7}{'%roof':>7}  bound"
    )
    lines = [head + cols, "-" * len(cols)]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"{r['op']:<15}{r['variant']:<11}{r['shape']:<34}  error: {r['error']}")
            continue
        lines.append(
            f"{r['op']:<15}{r['variant']:<11}{r['shape']:<34}{r['ms']:>10.4f}"
            f"{r['gb_per_s']:>9.1f}{100 * r['fraction_of_bandwidth']:>6.1f}%"
            f"{r['tflop_per_s']:>9.3f}{100 * r['fraction_of_matmul']:>6.1f}%"
            f"{100 * r['fraction_of_roofline']:>6.1f}%  {r['bound']}"
        )
    return "\n".join(lines)
