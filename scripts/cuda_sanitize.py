"""The per-op tests of the ``cuda`` backend for compute-sanitizer (run by scripts/gpu-check.sh).

Runs, with pytest, the tests marked ``cuda`` in the per-op test files (tests/test_guided_step.py,
tests/test_round_to_vocab.py, tests/test_sample_vocab.py) that ``-k`` selects; by default
``every_path and cuda-cuda``: each op's ``test_every_path_on_small_shapes`` on the cuda
backend, which calls every path of its kernels once on small, awkward shapes (N = 1,
d = 577 and d = 1 for the unaligned element-by-element loads, d = 64 for the 16-byte ones,
V not a multiple of the tile, a single vocabulary entry, several splits, fp32/fp16/bf16, the
elementwise, row-tile and per-sequence guided_step kernels, with and without column groups)
and checks the results against the references, so that memcheck, racecheck and synccheck
see every kernel and every branch. Stops at the first failure; exits with pytest's status
(non-zero when a test fails or none was selected), 2 without a CUDA device. Run it under
the sanitizer with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own
allocation::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python scripts/cuda_sanitize.py [-k EXPRESSION]

``-k cuda-cuda`` runs every cuda-backend test of those files (much slower under the
sanitizer); ``-k "every_path and (cuda-cuda or triton-cuda)"`` adds the Triton kernels
(with ``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("cuda_sanitize")

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = (
    "tests/test_guided_step.py",
    "tests/test_round_to_vocab.py",
    "tests/test_sample_vocab.py",
)
DEFAULT_SELECTION = "every_path and cuda-cuda"


def main(argv: list[str] | None = None) -> int:
    """Run the selected cuda-marked tests; returns pytest's exit status (2 without CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k",
        dest="selection",
        default=DEFAULT_SELECTION,
        help=f"pytest -k expression over the cuda-marked tests (default: {DEFAULT_SELECTION!r})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import pytest
    import torch

    if not torch.cuda.is_available():
        log.error("no CUDA device is visible")
        return 2
    code = pytest.main(
        [
            "-m",
            "cuda",
            "-k",
            args.selection,
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            *(str(ROOT / path) for path in TEST_FILES),
        ]
    )
    log.info("pytest exited with status %d", int(code))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
