"""``fastdia serve``: an OpenAI-style completions server over one :class:`Generator`.

Endpoints: ``POST /v1/completions`` (``prompt`` or a list of prompts, ``max_tokens``, ``n``,
``seed``, plus the alignment fields ``reward``, ``guidance``, ``chat``), ``GET /v1/models``
and ``GET /health``. Requests are validated in full (types, ranges, the reward and its
critic, the prompt's length) before any row is queued; concurrent requests are batched by
:class:`fastdia.batcher.Batcher`. Errors are JSON ``{"error": {"message", "type",
"param"}}`` with a 4xx status (413 for an oversized body, 401 for a missing or wrong API
key, 503 with ``Retry-After`` when the queue is full). SIGTERM (uvicorn's) stops accepting
connections, lets the requests in flight finish, then stops the worker.

Sample ``i`` of prompt ``j`` uses ``seed + i`` (the request's seed, else a random one,
returned with each choice), the numbering of :meth:`fastdia.generate.Generator.generate`:
the same request gives the same text as the Python API.
"""

import asyncio
import copy
import hmac
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastdia.batcher import Batcher, QueueFull, Row
from fastdia.errors import FastdiaError
from fastdia.generate import GroupKey

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how the queue is bounded."""

    max_tokens: int = 256
    max_n: int = 16
    max_prompts: int = 16
    max_rows: int = 64  # prompts x n
    max_body_bytes: int = 65536
    max_queue: int = 256  # rows
    max_wait_ms: float = 20.0
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    disconnect_poll_s: float = 0.05


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read in
    full (by its Content-Length, or by counting a chunked body)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, 413, self._message(), "body")
            return
        seen = 0
        answered = False

        async def counted() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body: answer now, end the app's request
                    answered = True
                    await _send_error(send, 413, self._message(), "body")
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)

    def _message(self) -> str:
        return f"the request body is over {self.limit} bytes; send fewer or shorter prompts"


async def _send_error(send: Any, status: int, message: str, param: str | None) -> None:
    import json

    body = json.dumps(_error_body(message, param, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_body(message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = {
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        503: "overloaded_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def timing(arrived: float, queued: float, rows: list[Row]) -> dict[str, float]:
    """Where a request's time went (ms): validating and queueing it, waiting for its
    batches, sampling and scoring them, and ``overhead`` (everything but the wait and the
    sampling: validation, queueing, handing results back, building the answer)."""
    now = time.monotonic()
    start = min(r.started for r in rows)
    sample = max(r.finished for r in rows) - start
    total = now - arrived
    wait = start - queued
    ms = {"validate": queued - arrived, "wait": wait, "sample": sample, "total": total}
    ms["overhead"] = total - wait - sample
    return {k: round(v * 1000, 3) for k, v in ms.items()}


def create_app(
    generator: Any,
    *,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    model_name: str = "fastdia",
) -> Any:
    """The ASGI application (FastAPI, wrapped in :class:`BodyLimit`) over ``generator``.

    The batcher's worker starts with the application's lifespan and drains at its end.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    batcher = Batcher(
        generator,
        batch_sizes=limits.batch_sizes,
        max_wait=limits.max_wait_ms / 1000,
        max_queue=limits.max_queue,
    )
    tokenizer = copy.deepcopy(generator.base.tokenizer)  # the request thread's own copy
    started = time.time()

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: StrictStr | list[StrictStr]
        max_tokens: StrictInt = Field(32, ge=1, le=limits.max_tokens)
        n: StrictInt = Field(1, ge=1, le=limits.max_n)
        seed: StrictInt | None = Field(None, ge=0, lt=2**31)
        stream: StrictBool = False
        model: StrictStr | None = None
        reward: StrictStr | None = None
        guidance: float | None = Field(None, ge=0, strict=True)
        chat: StrictBool = False
        user: StrictStr | None = None

    class ApiError(Exception):
        def __init__(self, status: int, message: str, param: str | None = None) -> None:
            super().__init__(message)
            self.status, self.message, self.param = status, message, param

    @asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        batcher.start()
        log.info("fastdia serve: ready (batch sizes %s)", limits.batch_sizes)
        yield
        await asyncio.to_thread(batcher.stop)
        log.info("fastdia serve: stopped after %s", batcher.stats.to_dict())

    app = FastAPI(title="fastdia", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(
            _error_body(message, param, status), status_code=status, headers=headers
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        kind = first.get("type")
        if kind in ("json_invalid", "model_attributes_type", "dict_type"):
            return error(400, "body: the body must be a JSON object with a 'prompt'", None)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = where[0] if where else None
        what = first.get("msg", "invalid request")
        if kind == "extra_forbidden":
            what = "unknown field; known: " + ", ".join(CompletionRequest.model_fields)
        elif param == "prompt" and kind != "missing":
            what = "must be a string or a list of strings"
        return error(400, f"{param or 'body'}: {what}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {
            "status": "ok",
            "queued": batcher.queued(),
            "uptime_s": round(time.time() - started, 1),
            **batcher.stats.to_dict(),
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "fastdia",
                }
            ],
        }

    # the key is checked before the body is validated (a dependency runs first)
    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        arrived = time.monotonic()
        if body.stream:
            raise ApiError(
                400, "stream: streaming is not supported; leave it out or false", "stream"
            )
        if body.model is not None and body.model != model_name:
            raise ApiError(
                404,
                f"model: unknown model {body.model!r}; this server serves {model_name!r}",
                "model",
            )
        if body.guidance is not None and not math.isfinite(body.guidance):
            raise ApiError(400, "guidance: must be a finite number >= 0", "guidance")
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or len(prompts) > limits.max_prompts:
            raise ApiError(400, f"prompt: give 1 to {limits.max_prompts} prompts", "prompt")
        if len(prompts) * body.n > limits.max_rows:
            raise ApiError(400, f"n: prompts x n may be at most {limits.max_rows}", "n")
        key = GroupKey(
            generator.default_reward if body.reward is None else body.reward,
            body.guidance,
            body.max_tokens,
            body.chat,
        )
        encoded = []
        for j, text in enumerate(prompts):
            try:
                ids, key = generator.check(text, key, tokenizer=tokenizer)
            except FastdiaError as exc:
                param = "reward" if "reward" in str(exc) or "critic" in str(exc) else "prompt"
                where = f"prompt[{j}]" if len(prompts) > 1 and param == "prompt" else param
                raise ApiError(400, f"{where}: {exc}", param) from None
            encoded.append(ids)
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        loop = asyncio.get_running_loop()
        rows = [
            Row(key, ids, (seed + i) % 2**31, loop.create_future(), loop)
            for ids in encoded
            for i in range(body.n)
        ]
        try:
            batcher.submit(rows)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy ({exc}); retry shortly") from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc)) from None
        queued = time.monotonic()
        gathered = asyncio.gather(*(r.future for r in rows))
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=limits.disconnect_poll_s)
            if done:
                break
            if await request.is_disconnected():
                batcher.cancel(rows)
                gathered.cancel()
                log.info("client went away: %d rows cancelled", len(rows))
                raise ApiError(499, "client closed the request")
        generations = gathered.result()
        choices = [
            {
                "index": k,
                "text": g.completion,
                "finish_reason": "stop" if g.finished else "length",
                "logprobs": None,
                "seed": g.seed,
                "rewards": g.rewards,
            }
            for k, g in enumerate(generations)
        ]
        completion_tokens = sum(g.new_tokens for g in generations)
        prompt_tokens = sum(len(ids) for ids in encoded) * body.n
        return {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "fastdia": {
                "reward": key.reward,
                "guidance": generator.guidance(key.guidance, key.reward),
                "timing_ms": timing(arrived, queued, rows),
            },
        }

    return BodyLimit(app, limits.max_body_bytes)
