"""Resumable batch jobs: a JSONL file of requests in, a JSONL file of samples out.

One request per input line: ``{"id": ..., "prompt": ...}`` and optionally ``reward``,
``guidance``, ``new_tokens``, ``seed``, ``chat`` (the job's options fill in what a line
leaves out). Requests that share reward, guidance, new tokens and chat share batches; the
batches are cut from the whole input in input order, so they are the same in every run of
the job, done or not.

**Exact resume.** The output is appended one finished batch at a time (one write, flushed
and fsynced). A restarted job reads the output back, drops a torn last line (a crash in the
middle of a write), skips the ids already written and reruns the rest; a batch that was
cut short reruns whole, with the same rows, and writes only its missing lines. Every row's
noise is numbered under its own seed (the request's, else the job seed plus a CRC-32 of its
id), so the lines are byte for byte those of an uninterrupted run (sort by id to compare).

**Several processes** (``torchrun ... -m fastdia generate``): the pending batches are dealt
to the ranks by index (rank ``r`` of ``W`` runs batches ``r, r + W, ...``), each rank
appends its lines to a part file of its own (``OUTPUT.part-R``, with the same flush and
fsync), and rank 0 moves the parts into the output at the end, in batch order, so the
output is the one process's file. A job cut short resumes with any number of processes:
rank 0 first moves the parts left behind into the output (ids already there skipped).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdia.distributed import SINGLE, World
from fastdia.errors import ConfigError, FastdiaError
from fastdia.generate import GroupKey
from fastdia.rewards.registry import parse_reward_spec

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("id", "prompt", "reward", "guidance", "new_tokens", "seed", "chat")
MAX_SEED = 2**31


@dataclass(frozen=True)
class JobRequest:
    """One valid input line."""

    id: str
    prompt: str
    line: int
    key: GroupKey
    seed: int
    text: str  # the line as read (what an errors file keeps)


@dataclass(frozen=True)
class BadLine:
    """One input line that cannot be served, and why (the field is named)."""

    line: int
    error: str
    text: str

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "error": self.error, "text": self.text})


@dataclass(frozen=True)
class JobDefaults:
    """What a request line may leave out: the job's ``--reward``, ``--guidance``,
    ``--new-tokens``, ``--chat`` and ``--seed`` (a row's seed is ``seed + crc32(id)``)."""

    reward: str
    guidance: float | None
    new_tokens: int
    chat: bool
    seed: int = 0


def default_seed(job_seed: int, ident: str) -> int:
    """The seed of a request that gives none: the job seed plus a CRC-32 of its id."""
    return (job_seed + zlib.crc32(ident.encode("utf-8"))) % MAX_SEED


def parse_request(line: str, number: int, defaults: JobDefaults) -> JobRequest:
    """One input line as a request.

    Raises:
        ConfigError: naming the field: not a JSON object, an unknown field, a missing or
            empty ``id``/``prompt``, a value of the wrong type or out of range.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ConfigError("a request must be a JSON object with 'id' and 'prompt'")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_FIELDS)}"
        )
    ident = obj.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or str(ident) == "":
        raise ConfigError("'id' must be a non-empty string or an integer")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("'prompt' must be a non-empty string")
    reward = obj.get("reward", defaults.reward)
    if not isinstance(reward, str) or not reward.strip():
        raise ConfigError("'reward' must be a reward spec string, e.g. 'sentiment'")
    try:
        parse_reward_spec(reward)
    except ConfigError as exc:
        raise ConfigError(f"'reward': {exc}") from None
    guidance = obj.get("guidance", defaults.guidance)
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise ConfigError("'guidance' must be a number >= 0")
        guidance = float(guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"'guidance' must be a finite number >= 0, got {guidance}")
    new_tokens = obj.get("new_tokens", defaults.new_tokens)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ConfigError(f"'new_tokens' must be a positive integer, got {new_tokens!r}")
    chat = obj.get("chat", defaults.chat)
    if not isinstance(chat, bool):
        raise ConfigError(f"'chat' must be true or false, got {chat!r}")
    ident = str(ident)
    seed = obj.get("seed")
    if seed is None:
        seed = default_seed(defaults.seed, ident)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ConfigError(f"'seed' must be an integer in [0, 2**31), got {seed!r}")
    return JobRequest(
        ident, prompt, number, GroupKey(reward, guidance, new_tokens, chat), seed, line
    )


def read_requests(
    path: str | Path, defaults: JobDefaults
) -> tuple[list[JobRequest], list[BadLine]]:
    """Every line of a requests file, parsed: the valid requests and the bad lines (a
    repeated id is bad on its later lines). Blank lines are skipped.

    Raises:
        ConfigError: the file is missing, unreadable or holds no line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the input file {path}: {exc}") from exc
    requests: list[JobRequest] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            req = parse_request(text, number, defaults)
        except ConfigError as exc:
            bad.append(BadLine(number, str(exc), text))
            continue
        if req.id in seen:
            bad.append(BadLine(number, f"'id' {req.id!r} repeats line {seen[req.id]}", text))
            continue
        seen[req.id] = number
        requests.append(req)
    if not requests and not bad:
        raise ConfigError(f"the input file {path} holds no request (it is empty)")
    return requests, bad


def cut_batches(requests: list[JobRequest], batch_size: int) -> list[list[JobRequest]]:
    """Requests grouped by :class:`GroupKey` (groups in order of first appearance), each
    group cut into batches of ``batch_size`` in input order."""
    groups: dict[GroupKey, list[JobRequest]] = {}
    for req in requests:
        groups.setdefault(req.key, []).append(req)
    return [
        group[i : i + batch_size]
        for group in groups.values()
        for i in range(0, len(group), batch_size)
    ]


def read_done(path: Path) -> set[str]:
    """The ids already in an output file; a torn last line is cut off the file.

    Raises:
        FastdiaError: a line before the last that is not a record with an ``id`` (the
            file is not this job's output; nothing is changed).
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    keep = end
    lines = data[:end].splitlines()
    done: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        try:
            ident = json.loads(raw)["id"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines) and end == len(data):
                keep = end - len(raw) - 1  # a complete but unreadable last line: redo it
                break
            raise FastdiaError(
                f"output file {path}, line {number}, is not a fastdia record; it is not "
                "this job's output: pass another --output, or move the file away"
            ) from None
        done.add(str(ident))
    if keep < len(data):
        log.warning(
            "output %s: a torn last line (%d bytes) is cut off and redone", path, len(data) - keep
        )
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return done


def record(req: JobRequest, generation: Any, guidance: float) -> dict[str, Any]:
    """The output line of one request (no timings: a line is the same in every run);
    ``guidance`` is the one it ran with."""
    return {
        "id": req.id,
        "prompt": req.prompt,
        "text": generation.text,
        "completion": generation.completion,
        "new_tokens": generation.new_tokens,
        "finished": generation.finished,
        "seed": generation.seed,
        "reward": req.key.reward,
        "guidance": guidance,
        "chat": req.key.chat,
        "rewards": generation.rewards,
        "critic": generation.critic,
    }


@dataclass
class JobReport:
    """What a run of a job did."""

    requests: int
    already_done: int
    written: int
    new_tokens: int
    seconds: float


def pending_batches(batches: list[list[JobRequest]], done: set[str]) -> Iterator[list[JobRequest]]:
    """The batches with at least one id not yet written."""
    return (b for b in batches if any(r.id not in done for r in b))


def part_path(output: Path, rank: int) -> Path:
    """Where rank ``rank`` of a sharded job appends its lines."""
    return output.with_name(f"{output.name}.part-{rank}")


def merge_parts(output: Path, order: dict[str, int]) -> int:
    """Move the records of every rank's part file (:func:`part_path`) into ``output``:
    ids not yet there, sorted by ``order`` (id -> batch order), appended in one write
    (flushed, fsynced) before the parts are deleted. Returns the records moved."""
    parts = sorted(output.parent.glob(f"{output.name}.part-*"))
    if not parts:
        return 0
    done = read_done(output)
    records: dict[str, bytes] = {}
    for part in parts:
        read_done(part)  # a torn last line (a rank killed mid-write) is cut off
        for raw in part.read_bytes().splitlines(keepends=True):
            ident = str(json.loads(raw)["id"])
            if ident not in done:
                records[ident] = raw
    ordered = sorted(records, key=lambda ident: order.get(ident, len(order)))
    with output.open("ab") as f:
        f.write(b"".join(records[i] for i in ordered))
        f.flush()
        os.fsync(f.fileno())
    for part in parts:
        part.unlink()
    return len(records)


def run_job(
    generator: Any,
    requests: list[JobRequest],
    output: Path,
    *,
    batch_size: int = 16,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    world: World = SINGLE,
) -> JobReport:
    """Sample every request not yet in ``output`` and append its line, batch by batch.

    Args:
        generator: a :class:`fastdia.generate.Generator`.
        requests: the valid requests (checked: see :func:`check_requests`).
        output: the JSONL output (created, or resumed).
        batch_size: rows per batch; a short last batch of a group runs padded to it where
            ``generator.pads`` (on a GPU).
        on_start: called once with the number of requests left to write (by this rank).
        on_batch: called after each written batch with (rows written, tokens, seconds).
        world: this process's rank (:mod:`fastdia.distributed`): it runs its share of the
            pending batches into its part file; rank 0 merges the parts at the end.

    Returns:
        This rank's report (rank 0's counts ``already_done`` and ``requests`` for the job).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    batches = cut_batches(requests, batch_size)
    order = {r.id: i for i, r in enumerate(r for b in batches for r in b)}
    if world.is_main:
        merge_parts(output, order)  # a sharded run cut short
        done = read_done(output)  # cuts a torn last line before the other ranks read
    world.barrier()
    if not world.is_main:
        done = read_done(output)
    known = {r.id for r in requests}
    stray = sorted(done - known)
    if stray:
        raise FastdiaError(
            f"output {output} holds id {stray[0]!r} that the input does not ({len(stray)} such "
            "ids): it is another job's output; pass another --output"
        )
    mine = world.take(list(pending_batches(batches, done)))
    if on_start is not None:
        on_start(len({r.id for b in mine for r in b} - done))
    report = JobReport(len(requests), len(done), 0, 0, 0.0)
    start = time.perf_counter()
    target = part_path(output, world.rank) if world.distributed else output
    with target.open("ab") as f:
        for batch in mine:
            t0 = time.perf_counter()
            result = generator.run_batch(
                batch[0].key,
                [r.prompt for r in batch],
                [r.seed for r in batch],
                pad_to=batch_size if generator.pads else None,
            )
            fresh = [
                (r, g) for r, g in zip(batch, result.generations, strict=True) if r.id not in done
            ]
            lines = [
                json.dumps(
                    record(r, g, generator.guidance(r.key.guidance, r.key.reward)),
                    ensure_ascii=False,
                )
                + "\n"
                for r, g in fresh
            ]
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            tokens = sum(g.new_tokens for _, g in fresh)
            done.update(r.id for r in batch)
            report.written += len(lines)
            report.new_tokens += tokens
            if on_batch is not None:
                on_batch(len(lines), tokens, time.perf_counter() - t0)
    report.seconds = time.perf_counter() - start
    if world.distributed:
        world.barrier()  # every part complete
        if world.is_main:
            merge_parts(output, order)
    return report


def check_requests(
    generator: Any, requests: list[JobRequest]
) -> tuple[list[JobRequest], list[BadLine]]:
    """What only the loaded models can tell: an unknown reward, a reward the checkpoint has
    no critic for, a prompt too long for the context. Canonicalises each reward spec (so
    ``sentiment`` and ``sentiment:1`` share batches). Returns the valid requests and the
    bad lines."""
    good, bad = [], []
    for req in requests:
        try:
            _, key = generator.check(req.prompt, req.key)
        except FastdiaError as exc:
            bad.append(BadLine(req.line, str(exc), req.text))
            continue
        good.append(JobRequest(req.id, req.prompt, req.line, key, req.seed, req.text))
    return good, bad
