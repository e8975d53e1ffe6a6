"""Helpers shared by the benchmark scripts: environment facts and result files.

The environment record (machine, versions, date, git sha) is :func:`fastdia.profile.environment`,
shared with ``fastdia profile``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastdia.profile import environment

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "environment", "write_result"]


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the environment attached; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
