"""Helpers shared by the benchmark scripts: environment facts and result files.

The environment record (machine, versions, date, git sha) is :func:`fastdia.provenance.environment`,
shared with ``fastdia profile``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastdia.provenance import environment

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS",
    "emit_result",
    "environment",
    "median_seconds",
    "split_passthrough",
    "write_result",
]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the environment attached; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` split at ``--``: the script's own options, and those it passes on."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def emit_result(script: str, argv: list[str], out: str | None, fields: dict[str, Any]) -> None:
    """Print (and write to ``out``) one benchmark result: the device, git sha, date and
    versions, the command (``python -m benchmarks.<script> ARGV``), then ``fields``."""
    env = environment("cpu")
    result = {
        "device": env["device"],
        "git_sha": env["git_sha"],
        "date": env["date"],
        "versions": {k: env.get(k) for k in ("python", "torch", "triton", "fastdia")},
        "command": f"python -m benchmarks.{script} " + " ".join(argv),
        **fields,
    }
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
