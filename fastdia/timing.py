"""Timing device work honestly: medians of calls whose inputs rotate past the L2 cache
(:func:`bench_ms`), the peak memory a call allocates, and the device's own ceilings (a
device-to-device copy's bandwidth, a large matmul's rate: :func:`measure_ceilings`)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, when the device does not report its own
_MAX_COPIES = 256


def _l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2_BYTES)


def copies_past_l2(bytes_per_copy: int, device: torch.device | str) -> int:
    """How many copies of an input of ``bytes_per_copy`` to cycle through so that together
    they exceed twice the L2 cache (1 on the CPU, at most 256)."""
    device = torch.device(device)
    if device.type != "cuda" or bytes_per_copy <= 0:
        return 1
    return max(1, min(_MAX_COPIES, math.ceil(2 * _l2_bytes(device) / bytes_per_copy)))


def bench_ms(
    fn: Callable[[int], Any],
    device: torch.device | str,
    *,
    copies: int = 1,
    repeats: int = 10,
) -> float:
    """Median milliseconds of ``fn(i)``, ``i`` cycling over ``range(copies)`` (the input copy
    to use).

    On CUDA: ``triton.testing.do_bench`` (median, L2 flushed before each call; CUDA events
    if triton is not installed); on the CPU: ``repeats`` timed calls after one warm-up.
    """
    device = torch.device(device)
    counter = iter(range(2**62))

    def call() -> Any:
        return fn(next(counter) % copies)

    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        try:
            import triton.testing
        except ImportError:
            return _cuda_events_median_ms(call, repeats)
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _cuda_events_median_ms(call: Callable[[], Any], repeats: int) -> float:
    samples = []
    for _ in range(max(3, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak device memory allocated during ``fn()`` above what was allocated before
    (CUDA only; None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def measure_ceilings(device: torch.device | str, *, quick: bool = False) -> dict[str, Any]:
    """The device's own bandwidth (a device-to-device copy) and matmul rate.

    GPU: a 2 GiB float32 copy (counted as read + write) and an 8192^3 bf16 matmul; CPU: a
    256 MiB copy and a 1024^3 float32 matmul (64 MiB and 512^3 with ``quick``).

    Returns:
        ``{"bandwidth_gb_per_s", "matmul_tflop_per_s", "matmul_dtype", "copy_bytes",
        "matmul_size"}``.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    numel = 2**29 if cuda else (2**24 if quick else 2**26)  # CPU: past the last-level cache
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda _: dst.copy_(src), device, repeats=5 if quick else 10)
    bandwidth = 2 * numel * 4 / (ms * 1e-3) / 1e9
    src = dst = None  # free the copy buffers before the matmul
    size = 8192 if cuda else (512 if quick else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms_mm = bench_ms(lambda _: torch.matmul(a, b), device, repeats=5 if quick else 10)
    rate = 2 * size**3 / (ms_mm * 1e-3) / 1e12
    log.info(
        "ceilings on %s: %.1f GB/s copy, %.3f TFLOP/s %s matmul", device, bandwidth, rate, dtype
    )
    return {
        "bandwidth_gb_per_s": bandwidth,
        "matmul_tflop_per_s": rate,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_bytes": 2 * numel * 4,
        "matmul_size": size,
    }
