"""Running on several processes with PyTorch's own engine (``torch.distributed``, launched
by ``torchrun``).

``torchrun --nproc-per-node K [--nnodes N ...] -m fastdia COMMAND ...`` starts ``K x N``
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment. :func:`world` reads them and joins the process
group (gloo on the CPU, NCCL when the ranks have GPUs: rank ``r`` takes ``cuda:LOCAL_RANK``),
with a timeout so that a rank that never arrives, or dies mid-run, fails the whole job
with a message instead of hanging it. Without those variables every command runs as one
process, exactly as before (:data:`SINGLE`).

Work is split by index: rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``
(:meth:`World.take`), and everything a command writes is gathered to rank 0
(:meth:`World.gather`), which alone writes files. Sampling seeds are per row (or per
shard), so a sharded run writes what one process writes.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastdia.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_S = 600
"""How long a collective waits for every rank (``FASTDIA_DIST_TIMEOUT`` seconds)."""


@dataclass(frozen=True)
class World:
    """This process's place among the job's: ``rank`` of ``size`` (``local_rank`` on its
    machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes."""
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: those at indices ``rank, rank + size, ...``."""
        return list(items[self.rank :: self.size])

    def indices(self, count: int) -> range:
        """The indices of :meth:`take` among ``count`` items."""
        return range(self.rank, count, self.size)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (a list in rank order); None on the others."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank (a list in rank order)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def rows(self, batch: int) -> Any:
        """This rank's rows of a global batch of ``batch`` (``[n]`` int64: ``rank, rank +
        size, ...``): each rank trains on its share of the same global batch."""
        import torch

        return torch.arange(self.rank, batch, self.size)

    def sum(self, value: Any) -> Any:
        """A tensor summed over ranks (a new tensor; itself on one process)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def all_rows(self, part: Any, batch: int) -> Any:
        """A per-row tensor of a global batch from every rank's rows of it (:meth:`rows`):
        ``[batch, ...]`` on every rank, in the global order."""
        if not self.distributed:
            return part
        import torch

        parts = self.all_gather(part.detach().cpu())
        out = torch.empty((batch, *part.shape[1:]), dtype=part.dtype)
        for rank, piece in enumerate(parts):
            out[rank :: self.size] = piece
        return out.to(part.device)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World()


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={text!r} must be an integer") from None


_WORLD: World | None = None


def world(device: str | None = None) -> World:
    """This process's :class:`World`, joining the process group on first use when
    ``torchrun`` (or the ``RANK`` / ``WORLD_SIZE`` variables) started it.

    Args:
        device: the device the command runs on (``cuda``: NCCL and ``cuda:LOCAL_RANK``;
            anything else: gloo).

    Raises:
        ConfigError: inconsistent variables, or a process group that cannot form within
            the timeout (names the rendezvous address).
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if size is None or size <= 1:
        _WORLD = SINGLE
        return _WORLD
    if rank is None or not 0 <= rank < size:
        raise ConfigError(f"RANK must be in [0, {size}) when WORLD_SIZE={size}, got {rank}")
    local = _env_int("LOCAL_RANK") or 0
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=_env_int("FASTDIA_DIST_TIMEOUT") or TIMEOUT_S)
    cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    except Exception as exc:
        raise ConfigError(
            f"rank {rank} of {size} could not join the process group at {where} within "
            f"{timeout.total_seconds():.0f} s ({exc}); check that every rank started and "
            "can reach it"
        ) from exc
    _WORLD = World(rank, size, local)
    log.info("rank %d of %d joined the process group at %s", rank, size, where)
    return _WORLD


def rank_device(device: str, w: World) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``; others unchanged."""
    return f"cuda:{w.local_rank}" if device == "cuda" and w.distributed else device


def finish() -> None:
    """Leave the process group (every rank, at the end of a command)."""
    global _WORLD
    if _WORLD is not None and _WORLD.distributed:
        import gc

        import torch.distributed as dist

        # free what still holds the group (a DistributedDataParallel reducer in a reference
        # cycle) while it exists: freed after destroy_process_group, its C++ destructor
        # aborted a rank at exit ("terminate called without an active exception")
        gc.collect()
        dist.barrier()  # no rank leaves (rank 0 holds the rendezvous store) while others work
        dist.destroy_process_group()
    _WORLD = None
