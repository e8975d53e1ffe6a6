"""Dynamic batching: rows from concurrent requests, run together on one worker thread.

A request adds its rows (one per prompt and sample) to a bounded queue and awaits their
futures. The worker takes the oldest waiting row, waits up to ``max_wait`` (from that row's
arrival, or from the end of the previous batch if that is later, so that the clients just
answered can join) for more rows with the same settings
(:class:`~fastdia.generate.GroupKey`), takes
at most the largest batch size, pads to the smallest configured batch size that holds them
(so a few captured plans serve every batch) and runs them through
:meth:`fastdia.generate.Generator.run_batch`. Rows of a request whose client went away are
cancelled and dropped before they cost compute (a batch already running finishes).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastdia.errors import ConfigError
from fastdia.generate import GroupKey

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already: the caller should retry later."""


@dataclass(eq=False)
class Row:
    """One row to sample, and where its result goes (an asyncio future on ``loop``)."""

    key: GroupKey
    prompt: list[int]
    seed: int
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: float = 0.0  # when its batch started and finished (time.monotonic)
    finished: float = 0.0


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


@dataclass
class BatcherStats:
    """What the worker did: batches by padded size, rows, cancelled rows, busy seconds."""

    batch_sizes: Counter[int] = field(default_factory=Counter)
    rows: int = 0
    cancelled: int = 0
    failed: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "rows": self.rows,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "busy_seconds": round(self.busy_seconds, 3),
        }


class Batcher:
    """The queue and its worker thread (see the module docstring).

    Args:
        generator: a :class:`fastdia.generate.Generator` (used by the worker thread only).
        batch_sizes: the padded batch sizes, ascending (the largest is the maximum batch).
        max_wait: seconds a row may wait for company before its batch runs.
        max_queue: rows that may wait at once; :meth:`submit` raises :class:`QueueFull`
            beyond.
    """

    def __init__(
        self,
        generator: Any,
        *,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
        max_wait: float = 0.02,
        max_queue: int = 256,
    ) -> None:
        sizes = sorted(set(batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
        if max_wait < 0 or max_queue < 1:
            raise ConfigError("max_wait must be >= 0 and max_queue >= 1")
        self.generator = generator
        self.batch_sizes = sizes
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._pending: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._free_since = 0.0  # when the worker finished its last batch (time.monotonic)
        self._thread = threading.Thread(target=self._work, name="fastdia-batcher", daemon=True)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def queued(self) -> int:
        """Rows waiting (not yet in a running batch)."""
        with self._cond:
            return len(self._pending)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running batch and every queued row, then stop the worker."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` (all or none).

        Raises:
            QueueFull: the queue cannot take them now.
            RuntimeError: the batcher is stopping.
        """
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} rows are queued (at most {self.max_queue})")
            self._pending.extend(rows)
            self._cond.notify_all()

    def cancel(self, rows: Sequence[Row]) -> None:
        """Drop rows that have not run yet (their client went away)."""
        with self._cond:
            for row in rows:
                row.cancelled = True
            self._cond.notify_all()

    # ---- the worker thread -----------------------------------------------------------
    def _take(self) -> list[Row] | None:
        """The next batch (None: stopped and drained)."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self.stats.cancelled += 1
                    self._pending.popleft()
                if self._pending:
                    break
                if self._stop:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = max(first.enqueued, self._free_since) + self.max_wait
            while True:
                mates = [r for r in self._pending if r.key == first.key and not r.cancelled]
                left = deadline - time.monotonic()
                if len(mates) >= self.max_batch or left <= 0 or self._stop or first.cancelled:
                    break
                self._cond.wait(left)
            if first.cancelled:
                return []
            batch = mates[: self.max_batch]
            taken = set(map(id, batch))
            self._pending = deque(r for r in self._pending if id(r) not in taken)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            size = next(s for s in self.batch_sizes if s >= len(batch))
            start = time.perf_counter()
            started = time.monotonic()
            for row in batch:
                row.started = started
            try:
                result = self.generator.run_batch(
                    batch[0].key, [r.prompt for r in batch], [r.seed for r in batch], pad_to=size
                )
            except Exception as exc:  # every row's request gets the error, the worker lives
                log.exception("a batch of %d rows failed", len(batch))
                self.stats.failed += len(batch)
                for row in batch:
                    row.loop.call_soon_threadsafe(_resolve, row.future, None, exc)
                self._free_since = time.monotonic()
                continue
            self.stats.busy_seconds += time.perf_counter() - start
            finished = self._free_since = time.monotonic()
            self.stats.batch_sizes[size] += 1
            self.stats.rows += len(batch)
            for row, generation in zip(batch, result.generations, strict=True):
                row.finished = finished
                row.loop.call_soon_threadsafe(_resolve, row.future, generation, None)
