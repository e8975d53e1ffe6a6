"""``fastdia serve``: the HTTP server (:mod:`fastdia.serve`) on uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from typing import Any

from fastdia.errors import AssetMissingError, FastdiaError

log = logging.getLogger(__name__)

API_KEY_ENV = "FASTDIA_API_KEY"


def add_parser(sub: Any) -> None:
    """Register the ``serve`` subcommand."""
    from fastdia.cli_generate import add_model_options
    from fastdia.cli_options import positive_int
    from fastdia.generate import DEFAULT_REWARD
    from fastdia.serve import ServeLimits

    d = ServeLimits()
    p = sub.add_parser("serve", help="an OpenAI-style HTTP server with dynamic batching")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument("--reward", default=DEFAULT_REWARD, help="reward of requests that name none")
    p.add_argument(
        "--max-batch", type=positive_int, default=d.batch_sizes[-1], help="rows per batch at most"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a row waits for others to share its batch",
    )
    p.add_argument(
        "--max-queue", type=positive_int, default=d.max_queue, help="rows waiting at most (503)"
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=d.max_tokens, help="max_tokens a request may ask"
    )
    p.add_argument("--model-name", default="fastdia", help="the model id of /v1/models")
    add_model_options(p)
    p.set_defaults(func=cmd_serve)


def batch_sizes(max_batch: int, device: str) -> tuple[int, ...]:
    """The padded batch sizes: on a GPU, powers of two up to ``max_batch`` and
    ``max_batch`` itself (a few captured graphs serve every batch; padding rows cost
    little); on a CPU every size up to ``max_batch`` (no graphs; a padding row costs as much
    as a real one)."""
    if device != "cuda":
        return tuple(range(1, max_batch + 1))
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate, load once, serve until SIGTERM / Ctrl-C (requests in flight finish)."""
    from fastdia.cli_generate import generator_from_args
    from fastdia.serve import ServeLimits, create_app

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise AssetMissingError(
                f"fastdia serve needs {module}: pip install 'fastdia[serve]' (or run "
                "scripts/setup-env.sh)"
            )
    if not 0 <= args.port < 65536:
        raise FastdiaError(f"--port must be in [0, 65536), got {args.port}")
    if not 0 <= args.max_wait_ms <= 10_000:
        raise FastdiaError(f"--max-wait-ms must be in [0, 10000], got {args.max_wait_ms}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", args.host
        )
    generator = generator_from_args(args, reward=args.reward)
    limits = ServeLimits(
        max_tokens=args.max_tokens,
        max_queue=args.max_queue,
        max_wait_ms=args.max_wait_ms,
        batch_sizes=batch_sizes(args.max_batch, str(generator.device).split(":")[0]),
    )
    app = create_app(generator, limits=limits, api_key=api_key, model_name=args.model_name)
    import uvicorn

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=None,  # SIGTERM: wait for the requests in flight
    )
    uvicorn.Server(config).run()
    return 0
