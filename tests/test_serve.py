"""``fastdia serve``: the batcher, the HTTP API (answers, bad input, keys, limits,
disconnects), a small load and fault run, and SIGTERM draining a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastdia.batcher import Batcher, QueueFull, Row  # noqa: E402
from fastdia.cli_serve import batch_sizes  # noqa: E402
from fastdia.generate import Generation, Generator, GroupKey  # noqa: E402
from fastdia.serve import ServeLimits, create_app  # noqa: E402
from fastdia.serve_client import free_port, get, post  # noqa: E402

SETTINGS = {"steps": 3, "on_eos": "mask", "decode": "lm", "stop_at": 0.5}
PROMPTS = ["The movie was", "My day", "I think that the", "Food"]


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator(base_model=str(tiny_model_dir), random_init=True, settings=SETTINGS)


@contextlib.contextmanager
def serving(app):
    """``app`` on uvicorn in a thread, on a free loopback port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _post(port, body, **kw):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return post("127.0.0.1", port, raw, **kw)


# ---- the batcher --------------------------------------------------------------------------
class FakeGenerator:
    """Records the batches it runs; a row's text is its prompt and seed."""

    def __init__(self, delay=0.0):
        self.batches, self.delay = [], delay

    def run_batch(self, key, prompts, seeds, *, pad_to=None):
        time.sleep(self.delay)
        self.batches.append((key, len(prompts), pad_to))
        gens = [
            Generation(None, f"{p}/{s}", f"{p}/{s}", [], 1, False, s, {}, {})
            for p, s in zip(prompts, seeds, strict=True)
        ]
        return type("R", (), {"generations": gens})


def test_batch_sizes_are_powers_of_two_on_a_gpu_and_every_size_on_a_cpu():
    assert batch_sizes(16, "cuda") == (1, 2, 4, 8, 16)
    assert batch_sizes(12, "cuda") == (1, 2, 4, 8, 12) and batch_sizes(1, "cuda") == (1,)
    assert batch_sizes(5, "cpu") == (1, 2, 3, 4, 5)


def test_batcher_groups_by_settings_pads_and_bounds_its_queue():
    fake = FakeGenerator()
    batcher = Batcher(fake, batch_sizes=(1, 2, 4), max_wait=0.2, max_queue=8)
    a, b = GroupKey("sentiment", None, 8, False), GroupKey("sentiment", 2.0, 8, False)

    async def go():
        loop = asyncio.get_running_loop()
        rows = [Row(a if i % 3 else b, [i], i, loop.create_future(), loop) for i in range(7)]
        with pytest.raises(QueueFull):
            batcher.submit(rows + rows[:2])  # 9 > 8: none is queued
        batcher.submit(rows)
        batcher.start()
        return await asyncio.gather(*(r.future for r in rows))

    results = asyncio.run(go())
    batcher.stop(5)
    assert [g.text for g in results] == [f"[{i}]/{i}" for i in range(7)]
    # rows 1,2,4,5 (key a) in one batch of 4; 0,3,6 (key b) in one of 3, padded to 4
    assert sorted((k.guidance or 0, n, pad) for k, n, pad in fake.batches) == [
        (0, 4, 4),
        (2.0, 3, 4),
    ]
    assert batcher.stats.rows == 7 and batcher.stats.batch_sizes == {4: 2}


def test_cancelled_rows_cost_nothing():
    fake = FakeGenerator(delay=0.3)
    batcher = Batcher(fake, batch_sizes=(1,), max_wait=0.0, max_queue=8)
    key = GroupKey("sentiment", None, 8, False)

    async def go():
        loop = asyncio.get_running_loop()
        first = Row(key, [0], 0, loop.create_future(), loop)
        later = [Row(key, [i], i, loop.create_future(), loop) for i in (1, 2)]
        batcher.start()
        batcher.submit([first])
        await asyncio.sleep(0.1)  # the first batch is running
        batcher.submit(later)
        batcher.cancel(later)
        return await first.future

    assert asyncio.run(go()).text == "[0]/0"
    batcher.stop(5)
    assert len(fake.batches) == 1 and batcher.stats.cancelled == 2


# ---- the HTTP API -------------------------------------------------------------------------
def test_completions_match_the_python_api(generator):
    with serving(create_app(generator)) as port:
        status, body = _post(port, {"prompt": PROMPTS[:2], "max_tokens": 6, "n": 2, "seed": 7})
        assert status == 200, body
        assert get("127.0.0.1", port, "/health")["status"] == "ok"
        assert get("127.0.0.1", port, "/v1/models")["data"][0]["id"] == "fastdia"
    want = generator.generate(PROMPTS[:2], new_tokens=6, num_samples=2, seed=7)
    assert [c["text"] for c in body["choices"]] == [g.completion for g in want.generations]
    assert [c["seed"] for c in body["choices"]] == [7, 8, 7, 8]
    assert body["usage"]["completion_tokens"] == 24 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert set(body["choices"][0]["rewards"]) == {"sentiment", "total"}
    timing = body["fastdia"]["timing_ms"]
    assert timing["sample"] > 0 and timing["total"] >= timing["sample"] + timing["wait"]


BAD = [
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 120}, "prompt"),  # past the tiny model's context of 128
    ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "reward": "happiness"}, "reward"),
    ({"prompt": "x", "reward": ""}, "reward"),
    ({"prompt": "x", "guidance": -1}, "guidance"),
    ({"prompt": "x", "guidance": "high"}, "guidance"),
    ({"prompt": "x", "temperature": 0.7}, "temperature"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"max_tokens": 4}, "prompt"),
    (b"{not json", None),
    (b"[1, 2]", None),
]


def test_bad_requests_get_4xx_naming_the_field_and_never_reach_the_sampler(generator):
    fake = FakeGenerator()
    fake.base, fake.default_reward = generator.base, generator.default_reward
    fake.check, fake.guidance = generator.check, generator.guidance
    with serving(create_app(fake)) as port:
        for body, param in BAD:
            status, answer = _post(port, body)
            assert 400 <= status < 500, (body, status, answer)
            assert answer["error"]["param"] == param, (body, answer)
            assert answer["error"]["message"], body
        status, answer = _post(port, {"prompt": "x" * 100_000})
        assert status == 413 and "over 65536 bytes" in answer["error"]["message"]
        status, _ = _post(port, {"prompt": "still alive", "max_tokens": 4})
        assert status == 200
    assert len(fake.batches) == 1


def test_api_key(generator):
    with serving(create_app(generator, api_key="s3cret")) as port:
        ok = {"prompt": "x", "max_tokens": 4}
        assert _post(port, ok)[0] == 401
        assert _post(port, ok, headers={"Authorization": "Bearer nope"})[0] == 401
        assert _post(port, ok, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert _post(port, {"prompt": 3})[0] == 401  # the key before the body
        assert get("127.0.0.1", port, "/health")["status"] == "ok"  # no key needed


def test_a_full_queue_answers_503_and_the_server_recovers(generator):
    slow = FakeGenerator(delay=0.5)
    slow.base, slow.default_reward = generator.base, generator.default_reward
    slow.check, slow.guidance = generator.check, generator.guidance
    limits = ServeLimits(max_queue=2, batch_sizes=(1,), max_wait_ms=0)
    with serving(create_app(slow, limits=limits)) as port:
        results = []

        def send():
            results.append(_post(port, {"prompt": "x", "max_tokens": 4, "n": 2}))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(s for s, _ in results)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
        busy = next(b for s, b in results if s == 503)
        assert "retry" in busy["error"]["message"]
        assert _post(port, {"prompt": "x", "max_tokens": 4})[0] == 200


def test_a_client_that_goes_away_stops_costing_compute(generator):
    slow = FakeGenerator(delay=0.5)
    slow.base, slow.default_reward = generator.base, generator.default_reward
    slow.check, slow.guidance = generator.check, generator.guidance
    limits = ServeLimits(batch_sizes=(1,), max_wait_ms=0)
    with serving(create_app(slow, limits=limits)) as port:
        blocker = threading.Thread(target=_post, args=(port, {"prompt": "x", "max_tokens": 4}))
        blocker.start()
        time.sleep(0.1)
        body = json.dumps({"prompt": "gone", "max_tokens": 4, "n": 3}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.1)
        blocker.join()
        time.sleep(0.3)
        health = get("127.0.0.1", port, "/health")
    assert health["cancelled"] == 3 and health["rows"] == 1 and len(slow.batches) == 1


def _load_mix(new_tokens):
    """40 requests in a fixed order: valid completions (a prompt and a seed each), the bad
    bodies of BAD and oversized ones; as (kind, body, prompt, seed)."""
    mix = []
    for i in range(40):
        if i % 10 == 3:
            mix.append(("oversized", json.dumps({"prompt": "x" * 200_000}).encode(), None, None))
        elif i % 3 == 1:
            body, _ = BAD[i % len(BAD)]
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            mix.append(("bad", raw, None, None))
        else:
            prompt, seed = PROMPTS[i % len(PROMPTS)], 100 + i
            body = {"prompt": prompt, "max_tokens": new_tokens, "seed": seed}
            mix.append(("valid", json.dumps(body).encode(), prompt, seed))
    return mix


def test_small_load_and_fault_run(generator):
    """Six clients send valid, bad and oversized requests at once: every valid one is
    answered with the Python API's text for its prompt and seed, every bad one 4xx, no
    5xx, nothing lost, and the server batched concurrent rows."""
    mix = _load_mix(new_tokens=6)
    answers, errors, lock = {}, [], threading.Lock()
    todo = iter(range(len(mix)))

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                answer = post("127.0.0.1", port, mix[i][1], timeout=120)
            except Exception as exc:  # a lost request: counted, not raised in the thread
                with lock:
                    errors.append((i, repr(exc)))
                continue
            with lock:
                answers[i] = answer

    with serving(create_app(generator)) as port:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        health = get("127.0.0.1", port, "/health")
        assert _post(port, {"prompt": "x", "max_tokens": 4})[0] == 200  # alive afterwards
    assert not errors and sorted(answers) == list(range(len(mix)))  # nothing lost
    statuses = {
        kind: [answers[i][0] for i, m in enumerate(mix) if m[0] == kind] for kind, *_ in mix
    }
    assert set(statuses["valid"]) == {200}, statuses
    assert all(400 <= s < 500 for s in statuses["bad"]), statuses
    assert set(statuses["oversized"]) == {413}, statuses
    assert any(int(size) > 1 for size in health["batch_sizes"]), health
    valid = [(i, m) for i, m in enumerate(mix) if m[0] == "valid"]
    want = generator.generate(
        [m[2] for _, m in valid], new_tokens=6, seed=[m[3] for _, m in valid], batch_size=8
    )
    texts = [answers[i][1]["choices"][0]["text"] for i, _ in valid]
    assert texts == [g.completion for g in want.generations]
    assert health["rows"] == len(valid)


def test_sigterm_drains_requests_in_flight(tiny_model_dir):
    """A real ``fastdia serve`` process: a request sent before SIGTERM is answered, then
    the process exits (uvicorn re-raises the signal once it has drained: status -15)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fastdia.cli", "serve", "--port", str(port)]
    cmd += ["--base-model", str(tiny_model_dir), "--random-init", "--steps", "40"]
    cmd += ["--on-eos", "mask", "--decode", "lm", "--stop-at", "0.5"]
    proc = subprocess.Popen(cmd, env={**os.environ, "FASTDIA_API_KEY": "k"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                get("127.0.0.1", port, "/health")
                break
            except OSError:
                time.sleep(0.1)
        answers = []
        body = json.dumps({"prompt": PROMPTS, "max_tokens": 48, "n": 4}).encode()
        sender = threading.Thread(
            target=lambda: answers.append(
                post("127.0.0.1", port, body, headers={"Authorization": "Bearer k"})
            )
        )
        sender.start()
        time.sleep(0.5)
        assert get("127.0.0.1", port, "/health")["rows"] == 0  # still running
        proc.send_signal(signal.SIGTERM)
        sender.join(120)
        assert proc.wait(120) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    status, answer = answers[0]
    assert status == 200 and len(answer["choices"]) == 16
