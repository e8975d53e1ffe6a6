"""Load and fault test of ``fastdia serve``: concurrent clients, valid and bad requests.

From the repository root (loopback only; bounded in requests and in time)::

    python -m benchmarks.serve_load --clients 16 --duration 600 --new-tokens 16 --steps 10
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200

Without ``--url`` it starts ``fastdia serve`` on a free loopback port (the options after
``--`` go to it) and stops it with SIGTERM at the end (its exit status is reported).
``--clients`` threads send requests until ``--requests`` are sent or ``--duration``
seconds have passed: a seeded mix of valid completions (one sample of a shipped eval prompt,
``--new-tokens`` tokens, a seed each) and bad ones (wrong types, an unknown reward, too
many tokens, an unknown field, an empty prompt, bodies that are not JSON or over the
server's limit). Reports throughput (completion tokens per second of wall time), p50/p99
latency of the valid requests, the server's batch-size histogram, and counts by kind and
status; 5xx answers and requests without an answer are counted as such.

``--baseline`` then times the Python API on the same valid work (the same prompts, seeds
and settings, in batches of the server's largest batch size, in this process after the
server has stopped), and ``--check`` compares every valid answer with the Python API's
text for the same prompt and seed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from benchmarks.common import emit_result, split_passthrough
from fastdia.serve_client import free_port, get, post

log = logging.getLogger("serve_load")

BAD_KINDS = (
    "bad-type",
    "unknown-reward",
    "too-many-tokens",
    "unknown-field",
    "empty-prompt",
    "not-json",
)
OVERSIZED_BYTES = 200_000  # over the server's default limit of 65,536


@dataclass
class Answer:
    """One request and what came back (status 0: no answer: a lost request)."""

    kind: str
    status: int
    seconds: float
    prompt: str | None = None
    seed: int | None = None
    text: str | None = None
    tokens: int = 0
    error: str | None = None
    overhead_ms: float | None = None  # the server's own account: time beyond wait and sampling


def make_request(
    rng: random.Random,
    prompts: list[str],
    new_tokens: int,
    *,
    bad_frac: float,
    oversized_frac: float,
) -> tuple[str, bytes, str | None, int | None]:
    """One request of the mix: (kind, body, prompt, seed); prompt and seed for valid ones."""
    roll = rng.random()
    prompt, seed = rng.choice(prompts), rng.randrange(2**31)
    if roll < oversized_frac:
        return "oversized", json.dumps({"prompt": "x" * OVERSIZED_BYTES}).encode(), None, None
    if roll < oversized_frac + bad_frac:
        kind = rng.choice(BAD_KINDS)
        body: Any = {"prompt": prompt, "max_tokens": new_tokens}
        if kind == "bad-type":
            body["max_tokens"] = str(new_tokens)
        elif kind == "unknown-reward":
            body["reward"] = "happiness"
        elif kind == "too-many-tokens":
            body["max_tokens"] = 100_000
        elif kind == "unknown-field":
            body["temperature"] = 0.7
        elif kind == "empty-prompt":
            body["prompt"] = "   "
        else:
            return kind, b"{not json", None, None
        return kind, json.dumps(body).encode(), None, None
    body = {"prompt": prompt, "max_tokens": new_tokens, "seed": seed}
    return "valid", json.dumps(body).encode(), prompt, seed


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        valid = [a for a in self.answers if a.kind == "valid" and a.status == 200]
        lat = sorted(a.seconds for a in valid)
        over = sorted(a.overhead_ms for a in valid if a.overhead_ms is not None)
        by_kind: dict[str, Counter[int]] = {}
        for a in self.answers:
            by_kind.setdefault(a.kind, Counter())[a.status] += 1
        tokens = sum(a.tokens for a in valid)
        return {
            "requests": len(self.answers),
            "seconds": round(self.seconds, 2),
            "valid_answered": len(valid),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / self.seconds, 3) if self.seconds else 0.0,
            "latency_s": {
                "p50": round(statistics.median(lat), 3) if lat else None,
                "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
                "max": round(lat[-1], 3) if lat else None,
            },
            "overhead_ms": {
                "p50": round(statistics.median(over), 3) if over else None,
                "p99": round(over[min(len(over) - 1, int(0.99 * len(over)))], 3) if over else None,
            },
            "status_by_kind": {
                k: {str(s): n for s, n in sorted(c.items())} for k, c in sorted(by_kind.items())
            },
            "server_errors_5xx": sum(1 for a in self.answers if a.status >= 500),
            "lost": sum(1 for a in self.answers if a.status == 0),
            "bad_accepted": sum(
                1 for a in self.answers if a.kind != "valid" and 200 <= a.status < 300
            ),
        }


def run_load(
    host: str,
    port: int,
    *,
    clients: int,
    requests: int,
    duration: float,
    new_tokens: int,
    prompts: list[str],
    bad_frac: float = 0.2,
    oversized_frac: float = 0.05,
    seed: int = 0,
) -> LoadResult:
    """``clients`` threads sending the mix until ``requests`` are sent or ``duration``
    seconds have passed (a request in flight at the deadline is waited for)."""
    result = LoadResult()
    lock = threading.Lock()
    sent = [0]
    deadline = time.monotonic() + duration
    start = time.perf_counter()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            with lock:
                if sent[0] >= requests or time.monotonic() >= deadline:
                    return
                sent[0] += 1
            kind, body, prompt, row_seed = make_request(
                rng, prompts, new_tokens, bad_frac=bad_frac, oversized_frac=oversized_frac
            )
            t0 = time.perf_counter()
            try:
                status, payload = post(host, port, body)
            except (OSError, http.client.HTTPException) as exc:
                answer = Answer(kind, 0, time.perf_counter() - t0, error=repr(exc))
            else:
                answer = Answer(kind, status, time.perf_counter() - t0, prompt, row_seed)
                if status == 200 and isinstance(payload, dict):
                    answer.text = payload["choices"][0]["text"]
                    answer.tokens = payload["usage"]["completion_tokens"]
                    answer.overhead_ms = payload["fastdia"]["timing_ms"]["overhead"]
                elif isinstance(payload, dict) and "error" in payload:
                    answer.error = payload["error"]["message"][:200]
            with lock:
                result.answers.append(answer)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def python_api_texts(
    generator: Any, answers: list[Answer], new_tokens: int, batch_size: int
) -> tuple[dict[tuple[str, int], str], float, int]:
    """The Python API's completion of every valid (prompt, seed), in batches of
    ``batch_size`` (the server's largest); returns the texts, the seconds and the tokens."""
    rows = sorted({(a.prompt, a.seed) for a in answers if a.kind == "valid" and a.status == 200})
    out = generator.generate(
        [p for p, _ in rows],
        new_tokens=new_tokens,
        seed=[s for _, s in rows],
        batch_size=batch_size,
    )
    texts = {row: g.completion for row, g in zip(rows, out.generations, strict=True)}
    return texts, out.seconds, out.new_tokens


def start_server(port: int, server_args: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fastdia.cli", "serve", "--port", str(port), *server_args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastdia serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            get("127.0.0.1", port, "/health")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("fastdia serve did not come up in 300 s")


def main(argv: list[str] | None = None) -> int:
    full_argv = list(sys.argv[1:] if argv is None else argv)
    argv, server_args = split_passthrough(full_argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=10_000, help="stop after this many")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--bad-frac", type=float, default=0.2)
    p.add_argument("--oversized-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true", help="time the Python API on the same work")
    p.add_argument("--check", action="store_true", help="compare texts with the Python API")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from fastdia.evaluate import prompt_set

    prompts = prompt_set("neutral") + prompt_set("negative")
    proc = None
    if args.url:
        url = urlparse(args.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url must be a loopback address")
    else:
        host, port = "127.0.0.1", free_port()
        proc = start_server(port, server_args)
    load = run_load(
        host,
        port,
        clients=args.clients,
        requests=args.requests,
        duration=args.duration,
        new_tokens=args.new_tokens,
        prompts=prompts,
        bad_frac=args.bad_frac,
        oversized_frac=args.oversized_frac,
        seed=args.seed,
    )
    health = get(host, port, "/health")
    summary = load.summary()
    summary["server"] = health
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        summary["server_exit_status"] = proc.wait(timeout=120)
    if args.baseline or args.check:
        from fastdia.cli import build_parser
        from fastdia.cli_generate import generator_from_args

        served = build_parser().parse_args(["serve", *server_args])
        generator = generator_from_args(served, reward=served.reward)
        texts, seconds, tokens = python_api_texts(
            generator, load.answers, args.new_tokens, served.max_batch
        )
        summary["python_api"] = {
            "seconds": round(seconds, 2),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
        }
        if seconds:
            summary["server_to_python_api_throughput"] = round(
                summary["tokens_per_s"] / (tokens / seconds), 3
            )
        if args.check:
            valid = [a for a in load.answers if a.kind == "valid" and a.status == 200]
            summary["texts_differing_from_python_api"] = sum(
                1 for a in valid if texts[(a.prompt, a.seed)] != a.text
            )
    summary["threads"] = os.environ.get("OMP_NUM_THREADS")
    emit_result("serve_load", full_argv, args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
