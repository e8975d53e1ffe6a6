"""Where fastdia runs: the default device, the Triton interpreter switch, the GPU's size.

One home for the device facts that the command line, the op registry, the kernels and the
benchmarks all ask about. Importing this module imports nothing heavy (torch is imported
inside the functions that need it), so ``import fastdia`` stays lean.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastdia.errors import FastdiaError

if TYPE_CHECKING:
    import torch

__all__ = ["capture_graph", "default_device", "sm_count", "triton_interpreting"]

log = logging.getLogger(__name__)


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, on the CPU).

    Read on every call: tests and benchmarks set or clear the variable at run time.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_device(requested: str | None) -> str:
    """The device a command runs on: ``requested`` if given and usable, else cuda if present.

    Raises:
        FastdiaError: ``requested`` names a CUDA device but none is available.
    """
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise FastdiaError(
                f"--device {requested}: no CUDA device is available; use --device cpu"
            )
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 1 for other devices.

    The kernels size their grids with it (row tiles x d groups, vocabulary splits).
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def capture_graph(
    device: torch.device, warmup: Callable[[], None], body: Callable[[], None], what: str
) -> torch.cuda.CUDAGraph | None:
    """Run ``warmup`` on a side stream (autotuning, lazy allocations, library handles), then
    capture ``body`` as one CUDA graph on ``device``; None (with a warning naming ``what``)
    where the capture fails, so that the caller runs ``body`` eagerly instead."""
    import torch

    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warmup()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                body()
        except RuntimeError as err:
            log.warning("CUDA graph capture of %s failed, it runs eagerly: %s", what, err)
            return None
    return graph
