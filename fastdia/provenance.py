"""Where a measured number came from: the machine, the versions, the date and the git sha
stored beside every timing and benchmark result (:func:`environment`)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list[str], folder: Path | None) -> str | None:
    """``git ARGS``'s output in the checkout holding ``folder`` (default: fastdia's), or
    None outside a git checkout or when git fails."""
    folder = folder or Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=folder, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None


def git_sha(folder: Path | None = None) -> str:
    """The short git sha of the checkout holding ``folder`` (default: fastdia's), or
    ``"unknown"`` outside a git checkout."""
    out = _git(["rev-parse", "--short", "HEAD"], folder)
    return "unknown" if out is None else out.strip()


def git_dirty(folder: Path | None = None) -> bool | None:
    """Whether the checkout holding ``folder`` has uncommitted changes (None: unknown)."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return None if out is None else bool(out.strip())


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Machine, versions, date and git sha, to store beside every measured number.

    ``device`` (default: cuda if available) names the device the numbers are for.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastdia": _version("fastdia"),
        "numpy": _version("numpy"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "cuda": torch.version.cuda,
                "sm_count": props.multi_processor_count,
                "gpu_memory_gib": props.total_memory / 2**30,
                "l2_bytes": getattr(props, "L2_cache_size", None),
            }
        )
    return env
