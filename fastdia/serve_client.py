"""A minimal HTTP client of ``fastdia serve`` (standard library only): what the load
benchmark (``benchmarks/serve_load.py``) and the tests use to talk to a server.

>>> port = free_port()  # doctest: +SKIP
>>> status, body = post("127.0.0.1", port, b'{"prompt": "The movie was"}')  # doctest: +SKIP
>>> get("127.0.0.1", port, "/health")["status"]  # doctest: +SKIP
'ok'
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

__all__ = ["free_port", "get", "post"]

COMPLETIONS = "/v1/completions"


def post(
    host: str,
    port: int,
    body: bytes,
    *,
    timeout: float = 600.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST ``body`` (raw bytes: valid JSON or not) to ``/v1/completions``; returns the
    status and the parsed JSON answer (its text when it is not JSON). Any status is
    returned, 4xx and 5xx included; a connection that fails raises OSError or
    http.client.HTTPException."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            COMPLETIONS,
            body=body,
            headers={"content-type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def get(host: str, port: int, path: str, *, timeout: float = 30.0) -> Any:
    """GET ``path`` (e.g. ``/health``) and return its parsed JSON answer."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def free_port() -> int:
    """A loopback TCP port free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
