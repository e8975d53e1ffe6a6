"""GPU benchmark of the fused Triton kernels ``guided_step`` and ``round_to_vocab``.

One command, from the repository root on a machine with a CUDA GPU, torch and triton 3.6.0
(fastdia installed or not: the script puts the checkout on ``sys.path``)::

    python benchmarks/gpu_kernels.py

It (a) measures the device's ceilings: HBM bandwidth (a large device-to-device copy) and
the bf16 matmul rate (a large ``torch.matmul``); (b) times each op against the eager
reference and ``torch.compile`` of the reference (plus ``torch.matmul`` + ``argmax`` for
rounding) for ``N`` in {64, 1024, 8192} at ``(d, V) = (576, 49152)`` and ``(768, 50257)``,
with bytes, FLOPs, achieved GB/s and TFLOP/s, fractions of the measured ceilings and the
peak extra memory of each call; (c) prints one JSON object and writes it to
``$OUT/gpu_kernels.json`` if ``$OUT`` is set, else to
``benchmarks/results/gpu_kernels_<device>.json``.

The kernels' correctness on the device (fresh random inputs, awkward shapes, poisoned
outputs, ties, every dtype, every mode, counters as tensors, CUDA-graph replays) is tested
by the per-op test files, every variant against the reference:
``TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_guided_step.py
tests/test_round_to_vocab.py tests/test_sample_vocab.py`` (``bash scripts/gpu-check.sh``
runs them).

Targets (docs/design.md §5): ``guided_step`` >= 85% of HBM bandwidth and >= 8x the eager
reference; ``round_to_vocab`` (bf16) >= 60% of the bf16 matmul rate at N >= 4096, >= 2x
``torch.matmul`` + ``argmax``, extra memory O(N). Options: ``--quick`` (N = 64 and 1024
only, no ``torch.compile``), ``--no-compile``. Exits with a message and status 1 on a
machine without CUDA.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("gpu_kernels")

SHAPES = ((576, 49152), (768, 50257))  # (d, V): SmolLM2-135M and GPT-2
TOKENS = (64, 1024, 8192)
SEQ_LEN = 64
HIDDEN = 128  # one token-local critic of the default width


def _ensure_kernels_importable() -> None:
    """``fastdia.kernels`` is ``kernels/`` at the top of the checkout; alias it if fastdia is
    not installed (the install maps it through ``package-dir``)."""
    import fastdia

    try:
        import fastdia.kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fastdia.kernels",
            ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastdia.kernels"] = module
        spec.loader.exec_module(module)
        fastdia.kernels = module


# ---- timing ------------------------------------------------------------------------------


def _bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (``do_bench``: CUDA events, L2 flushed, after warm-up)."""
    from fastdia.timing import bench_ms

    return bench_ms(lambda _: fn(), "cuda")


def _peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak device memory allocated during ``fn()`` above what was allocated before."""
    from fastdia.timing import peak_extra_bytes

    return peak_extra_bytes(fn, "cuda")


def _try(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, error)`` with the traceback logged: a baseline that
    fails (``torch.compile`` of a reference) must not stop the benchmark."""
    try:
        return fn(), None
    except Exception as exc:
        log.warning("failed:\n%s", traceback.format_exc())
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return None, f"{type(exc).__name__}: {first}"


# ---- ceilings ----------------------------------------------------------------------------


def measure_ceilings() -> dict[str, float]:
    """HBM bandwidth of a 2 GiB device-to-device copy and the bf16 matmul rate
    (:func:`fastdia.timing.measure_ceilings`, under this script's key names)."""
    from fastdia.timing import measure_ceilings as measure

    ceil = measure("cuda")
    log.info(
        "ceilings: HBM %.0f GB/s, bf16 matmul %.0f TFLOP/s",
        ceil["bandwidth_gb_per_s"],
        ceil["matmul_tflop_per_s"],
    )
    return {
        "hbm_gb_per_s": ceil["bandwidth_gb_per_s"],
        "bf16_matmul_tflop_per_s": ceil["matmul_tflop_per_s"],
        "copy_bytes": ceil["copy_bytes"],
    }


# ---- inputs ------------------------------------------------------------------------------


def _stack(dim: int, hidden: int, seed: int, device: str):
    import torch

    from fastdia.ops import TokenLocalStack

    gen = torch.Generator(device=device).manual_seed(seed)
    return TokenLocalStack(
        w1=torch.randn(hidden, dim, generator=gen, device=device) / dim**0.5,
        b1=torch.randn(hidden, generator=gen, device=device),
        w2=torch.randn(hidden, generator=gen, device=device) / hidden**0.5,  # h_b = O(1)
        b2=torch.randn((), generator=gen, device=device),
    )


# ---- timing ------------------------------------------------------------------------------


def _compiled(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any] | None:
    if not enabled:
        return None
    import torch

    return torch.compile(fn)


def time_guided_step(
    ceil: dict[str, float], tokens: tuple[int, ...], compile_ref: bool
) -> list[dict[str, Any]]:
    import torch
    from fastdia.kernels.guided_step import guided_step

    from fastdia.ops.guided_step_ref import guided_step_reference

    dev = "cuda"
    compiled = _compiled(guided_step_reference, compile_ref)
    rows = []
    for dim, _ in SHAPES:
        for n in tokens:
            batch = n // SEQ_LEN if n >= SEQ_LEN else 1
            length = n // batch
            gen = torch.Generator(device=dev).manual_seed(n + dim)
            z = torch.randn(n, dim, generator=gen, device=dev)
            eps = torch.randn_like(z)
            coef = torch.tensor([1.0, -0.2, 0.3, 0.5], device=dev)
            lam = torch.tensor(2.0, device=dev)
            out = torch.empty_like(z)
            for variant, stack in (
                ("critic_H128", _stack(dim, HIDDEN, 0, dev)),
                ("no_critic", None),
            ):
                kw = {"seq_len": length, "seed": 3, "step": 5, "guidance": lam, "critic": stack}
                kernel_ms = _bench(functools.partial(guided_step, z, eps, coef, out=out, **kw))
                eager_ms = _bench(functools.partial(guided_step_reference, z, eps, coef, **kw))
                compile_ms, compile_error = None, None
                if compiled is not None:
                    compile_ms, compile_error = _try(
                        functools.partial(_bench, functools.partial(compiled, z, eps, coef, **kw))
                    )
                nbytes = 12 * n * dim + (4 * (HIDDEN * dim + 2 * HIDDEN) if stack else 0)
                flops = 4 * n * HIDDEN * dim if stack else 0
                gbs = nbytes / (kernel_ms * 1e-3) / 1e9
                row = {
                    "op": "guided_step",
                    "variant": variant,
                    "N": n,
                    "d": dim,
                    "B": batch,
                    "L": length,
                    "bytes": nbytes,
                    "flops": flops,
                    "triton_ms": kernel_ms,
                    "eager_reference_ms": eager_ms,
                    "compiled_reference_ms": compile_ms,
                    "achieved_gb_per_s": gbs,
                    "fraction_of_hbm": gbs / ceil["hbm_gb_per_s"],
                    "achieved_tflop_per_s": flops / (kernel_ms * 1e-3) / 1e12,
                    "speedup_vs_eager": eager_ms / kernel_ms,
                    "speedup_vs_compiled": compile_ms / kernel_ms if compile_ms else None,
                    "meets_85pct_hbm": gbs / ceil["hbm_gb_per_s"] >= 0.85,
                    "meets_8x_eager": eager_ms / kernel_ms >= 8,
                }
                if compile_error:
                    row["compiled_reference_error"] = compile_error
                log.info(
                    "guided_step %s N=%d d=%d: %.4f ms, %.0f GB/s (%.0f%% HBM), %.1fx eager",
                    variant,
                    n,
                    dim,
                    kernel_ms,
                    gbs,
                    100 * row["fraction_of_hbm"],
                    row["speedup_vs_eager"],
                )
                rows.append(row)
    return rows


def _matmul_argmax(z, w, bias):
    """The unfused baseline: ``[N, V]`` scores in the operand dtype, then ``argmax``."""
    import torch

    return (torch.matmul(z, w.T) + bias).argmax(-1)


def time_round_to_vocab(
    ceil: dict[str, float], tokens: tuple[int, ...], compile_ref: bool
) -> list[dict[str, Any]]:
    import torch
    from fastdia.kernels.round_to_vocab import round_to_vocab

    from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference

    dev = "cuda"
    compiled = _compiled(round_to_vocab_reference, compile_ref)
    rows = []
    for dim, vocab in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator(device=dev).manual_seed(dim)
            w = torch.randn(vocab, dim, generator=gen, device=dev).to(dtype)
            bias = -0.5 * w.float().pow(2).sum(-1)
            for n in tokens:
                z = torch.randn(n, dim, generator=gen, device=dev).to(dtype)
                out = torch.empty(n, dtype=torch.int64, device=dev)

                matmul_argmax = functools.partial(_matmul_argmax, z, w, bias)
                kernel_ms = _bench(functools.partial(round_to_vocab, z, w, bias, out=out))
                mm_ms = _bench(matmul_argmax)
                eager_ms = _bench(functools.partial(round_to_vocab_reference, z, w, bias))
                compile_ms, compile_error = None, None
                if compiled is not None:
                    compile_ms, compile_error = _try(
                        functools.partial(_bench, functools.partial(compiled, z, w, bias))
                    )
                es = w.element_size()
                nbytes = vocab * dim * es + n * dim * es + vocab * 4 + n * 8
                flops = 2 * n * dim * vocab
                tflops = flops / (kernel_ms * 1e-3) / 1e12
                gbs = nbytes / (kernel_ms * 1e-3) / 1e9
                extra = _peak_extra_bytes(functools.partial(round_to_vocab, z, w, bias))
                extra_mm = _peak_extra_bytes(matmul_argmax)
                row = {
                    "op": "round_to_vocab",
                    "dtype": str(dtype)[6:],
                    "N": n,
                    "d": dim,
                    "V": vocab,
                    "bytes": nbytes,
                    "flops": flops,
                    "triton_ms": kernel_ms,
                    "matmul_argmax_ms": mm_ms,
                    "eager_reference_ms": eager_ms,
                    "compiled_reference_ms": compile_ms,
                    "achieved_tflop_per_s": tflops,
                    "fraction_of_bf16_matmul": tflops / ceil["bf16_matmul_tflop_per_s"],
                    "achieved_gb_per_s": gbs,
                    "fraction_of_hbm": gbs / ceil["hbm_gb_per_s"],
                    "speedup_vs_matmul_argmax": mm_ms / kernel_ms,
                    "speedup_vs_eager": eager_ms / kernel_ms,
                    "speedup_vs_compiled": compile_ms / kernel_ms if compile_ms else None,
                    "peak_extra_bytes": extra,
                    "peak_extra_bytes_per_row": extra / n,
                    "matmul_argmax_peak_extra_bytes": extra_mm,
                }
                if dtype == torch.bfloat16:
                    row["meets_2x_matmul_argmax"] = mm_ms / kernel_ms >= 2
                    if n >= 4096:
                        row["meets_60pct_bf16_matmul"] = row["fraction_of_bf16_matmul"] >= 0.6
                if compile_error:
                    row["compiled_reference_error"] = compile_error
                log.info(
                    "round_to_vocab %s N=%d d=%d V=%d: %.4f ms, %.0f TFLOP/s (%.0f%% of bf16 "
                    "matmul), %.0f GB/s, %.1fx matmul+argmax, extra %d B",
                    row["dtype"],
                    n,
                    dim,
                    vocab,
                    kernel_ms,
                    tflops,
                    100 * row["fraction_of_bf16_matmul"],
                    gbs,
                    row["speedup_vs_matmul_argmax"],
                    extra,
                )
                rows.append(row)
    return rows


# ---- main --------------------------------------------------------------------------------


def _write(payload: dict[str, Any], device_name: str) -> Path:
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "gpu_kernels.json"
    else:
        from common import RESULTS

        slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_").lower()
        path = RESULTS / f"gpu_kernels_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {64, 1024}, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "run it on a machine with one. On the CPU, the kernels are tested under the Triton "
            "interpreter by: python -m pytest tests/test_guided_step.py "
            "tests/test_round_to_vocab.py tests/test_sample_vocab.py"
        )
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    _ensure_kernels_importable()
    import triton
    from common import environment

    env = environment()
    env.update(
        {
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        }
    )
    log.info("device %s, torch %s, triton %s", env["device"], env["torch"], env["triton"])
    tokens = TOKENS[:2] if args.quick else TOKENS
    compile_ref = not (args.quick or args.no_compile)

    payload: dict[str, Any] = {"environment": env}
    ceil = measure_ceilings()
    payload["ceilings"] = ceil
    payload["guided_step"] = time_guided_step(ceil, tokens, compile_ref)
    payload["round_to_vocab"] = time_round_to_vocab(ceil, tokens, compile_ref)
    gs = [r for r in payload["guided_step"] if r["N"] == max(tokens)]
    rv = [r for r in payload["round_to_vocab"] if r["dtype"] == "bfloat16"]
    payload["summary"] = {
        "guided_step_best_fraction_of_hbm_at_max_N": max(r["fraction_of_hbm"] for r in gs),
        "guided_step_min_speedup_vs_eager": min(r["speedup_vs_eager"] for r in gs),
        "round_to_vocab_bf16_best_fraction_of_matmul": max(
            r["fraction_of_bf16_matmul"] for r in rv
        ),
        "round_to_vocab_bf16_min_speedup_vs_matmul_argmax": min(
            r["speedup_vs_matmul_argmax"] for r in rv
        ),
        "round_to_vocab_max_extra_bytes_per_row": max(
            r["peak_extra_bytes_per_row"] for r in payload["round_to_vocab"]
        ),
    }
    path = _write(payload, env["device"])
    print(json.dumps(payload, indent=2))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
