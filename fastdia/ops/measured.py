"""Which variant of each op a measurement found fastest on a device: ``auto``'s first choice.

For an op on a CUDA device, ``backend="auto"`` takes the variant recorded here as fastest on
a device of the same name (``torch.cuda.get_device_name``), when that variant runs there;
without a record it keeps the registry's static priorities (today: triton on CUDA,
reference elsewhere). This module is the store (read, record, fastest): it measures
nothing. Records are never guessed: they are timings taken on the machine by
:mod:`fastdia.profile` (``fastdia profile``), stored with::

    fastdia profile --record                        # time every variant now, record
    fastdia profile --from prof.json --record       # record an earlier `fastdia profile` JSON

in ``$FASTDIA_PROFILE`` (default ``$FASTDIA_CACHE/profile.json``, i.e.
``~/.cache/fastdia/profile.json``)::

    {"version": 1, "devices": {"NVIDIA H100 80GB HBM3": {"guided_step": {
        "fastest": "cuda", "score": {"cuda": 1.0, "reference": 19.4, "triton": 1.21},
        "ms": {"cuda": {"N=64 d=576 H=128 L=32": 0.011, ...}, ...},
        "torch": "2.13.0", "fastdia": "0.1.0", "date": "..."}}}}

A variant's score is the geometric mean, over the shapes every recorded variant ran, of its
time over the shape's best time (1.0: the fastest on every shape); the fastest variant has
the lowest score.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PROFILE_ENV = "FASTDIA_PROFILE"
VERSION = 1

__all__ = [
    "PROFILE_ENV",
    "device_name",
    "fastest",
    "profile_path",
    "read_profile",
    "record",
    "record_profile",
]


def profile_path() -> Path:
    """``$FASTDIA_PROFILE``, else ``profile.json`` in fastdia's cache folder
    (``$FASTDIA_CACHE``, default ``~/.cache/fastdia``)."""
    env = os.environ.get(PROFILE_ENV)
    if env:
        return Path(env).expanduser()
    from fastdia.cache import cache_root

    return cache_root() / "profile.json"


def read_profile(path: Path | None = None) -> dict[str, Any]:
    """The stored records (an empty store when the file is missing or unreadable)."""
    path = path or profile_path()
    empty: dict[str, Any] = {"version": VERSION, "devices": {}}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable profile %s: %s", path, exc)
        return empty
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        log.warning("ignoring %s: not a fastdia profile", path)
        return empty
    return data


def device_name(device: torch.device | str) -> str | None:
    """The name records are stored under; None for a device that is not a visible GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def fastest(op: str, device: torch.device | str) -> str | None:
    """The variant recorded as fastest for ``op`` on ``device``, or None without a record.

    Costs one file check when nothing is stored (CUDA is not touched then).
    """
    path = profile_path()
    if not path.is_file():
        return None
    name = device_name(device)
    if name is None:
        return None
    entry = read_profile(path)["devices"].get(name, {}).get(op)
    return entry.get("fastest") if isinstance(entry, dict) else None


def _scores(ms: dict[str, dict[str, float]]) -> dict[str, float]:
    """Geometric mean of time over best time, over the shapes every variant has."""
    shapes = set.intersection(*(set(times) for times in ms.values()))
    if not shapes:
        raise ValueError(f"the variants {sorted(ms)} share no measured shape")
    best = {s: min(times[s] for times in ms.values()) for s in shapes}
    return {
        variant: math.exp(sum(math.log(times[s] / best[s]) for s in shapes) / len(shapes))
        for variant, times in ms.items()
    }


def record(
    name: str, op: str, ms: dict[str, dict[str, float]], *, path: Path | None = None
) -> dict[str, Any]:
    """Store the timings of ``op``'s variants on the device called ``name``.

    Args:
        name: the device name (:func:`device_name`).
        op: the op's registry name.
        ms: ``{variant: {shape label: milliseconds}}``.
        path: the store (default :func:`profile_path`).

    Returns:
        The stored entry. The file is rewritten atomically under a file lock, so records of
        other ops and devices are kept.
    """
    from filelock import FileLock  # a dependency of torch

    from fastdia import __version__

    times = {v: {s: float(t) for s, t in shapes.items() if t > 0} for v, shapes in ms.items()}
    times = {v: shapes for v, shapes in times.items() if shapes}
    if not times:
        raise ValueError(f"no timings to record for {op}")
    scores = _scores(times)
    entry = {
        "fastest": min(scores, key=lambda v: (scores[v], v)),
        "score": {v: round(s, 4) for v, s in sorted(scores.items())},
        "ms": {v: dict(sorted(shapes.items())) for v, shapes in sorted(times.items())},
        "torch": torch.__version__,
        "fastdia": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = read_profile(path)
        data["version"] = VERSION
        data["devices"].setdefault(name, {})[op] = entry
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    log.info("recorded in %s: %s on %s -> %s", path, op, name, entry["fastest"])
    return entry


def _timings(payload: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{op: {variant: {shape: ms}}}`` from a :func:`fastdia.profile.profile` payload."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in payload.get("rows", []):
        if "error" in row or "ms" not in row:
            continue
        out.setdefault(row["op"], {}).setdefault(row["variant"], {})[row["shape"]] = row["ms"]
    return out


def record_profile(
    payload: dict[str, Any], *, path: Path | None = None, write: bool = True
) -> dict[str, dict[str, Any]]:
    """Record every op of a ``fastdia profile`` payload (``{"environment", "rows", ...}``).

    Returns ``{op: entry}``; with ``write=False`` the entries are computed, not stored.

    Raises:
        ValueError: the payload was measured on a CPU (records steer ``auto`` on GPUs).
    """
    name = payload.get("environment", {}).get("device")
    if not name or name == "cpu":
        raise ValueError("only GPU measurements are recorded (auto on the CPU is the reference)")
    entries = {}
    for op, ms in _timings(payload).items():
        if write:
            entries[op] = record(name, op, ms, path=path)
        else:
            scores = _scores(ms)
            entries[op] = {"fastest": min(scores, key=lambda v: (scores[v], v)), "score": scores}
    return entries
