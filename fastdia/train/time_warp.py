"""CDCD time warping: where in ``t`` the denoiser's loss changes, and times drawn there.

``F(t)``, the loss rescaled to ``[0, 1]``, is how much of the denoising has happened by
noise level ``t``. Steps (sampling) or training times placed uniformly in ``F`` fall where
the loss changes fastest, which for embeddings as wide as the base model's is the last
tenth of a standard schedule, where tokens are decided (Dieleman et al. 2022, "CDCD").

:func:`time_warp` turns a loss curve into a grid ``F^{-1}`` (the step allocation a
checkpoint stores as ``time_grid``); :class:`OnlineTimeWarp` keeps a running loss curve
during training and draws the training times from it, so the model is trained where it
will be sampled instead of spending most of its steps at easy, low noise levels.
"""

from __future__ import annotations

from typing import Any

import torch

from fastdia.schedules import interp

WARP_UNIFORM_MIX = 0.1  # share of uniform time mixed into the warp (no empty stretches)
GRID_POINTS = 65  # points of a stored grid (64 intervals)
TRAIN_TIMES = ("uniform", "warp")  # how train-denoiser draws its training times


def time_warp(times: list[float], losses: list[float], *, points: int = GRID_POINTS) -> list[float]:
    """The step allocation of CDCD's time warping from a measured loss curve.

    ``F(t)`` is the loss rescaled to ``[0, 1]`` (made non-decreasing with a running
    maximum), mixed with ``WARP_UNIFORM_MIX`` of uniform time so it rises strictly. The
    result is ``F^{-1}`` at ``points`` evenly spaced values: ``[points]`` ascending times
    from 0 to 1; sampling steps placed uniformly in ``F`` fall where the loss changes
    fastest, i.e. where tokens are decided.

    Args:
        times: ascending times from 0 to 1 at which the loss was measured.
        losses: the loss at each of ``times``.
    """
    t = torch.tensor(times, dtype=torch.float64)
    loss = torch.cummax(torch.tensor(losses, dtype=torch.float64), dim=0).values
    span = float(loss[-1] - loss[0])
    f = (loss - loss[0]) / span if span > 0 else t.clone()
    f = (1 - WARP_UNIFORM_MIX) * f + WARP_UNIFORM_MIX * t
    grid = interp(torch.linspace(0, 1, points, dtype=torch.float64), f, t)
    grid[0], grid[-1] = 0.0, 1.0
    return [round(v, 6) for v in grid.tolist()]


def warped(grid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F^{-1}(u)``: ``u`` (any shape, in ``[0, 1]``) mapped through the piecewise-linear
    grid ``[G]`` (ascending from 0 to 1, at evenly spaced ``u``); float32 like ``u``."""
    knots = torch.linspace(0, 1, len(grid), dtype=torch.float64)
    return interp(u.to(torch.float64).clamp(0, 1), knots, grid).to(u.dtype)


class OnlineTimeWarp:
    """Training times drawn uniformly in a running loss curve (CDCD's learned warp).

    The loss of every training window is filed under its time in one of ``bins`` equal
    bins of ``[0, 1]`` (an exponential moving average per bin, ``momentum``); every
    ``refresh_every`` observed batches, once every bin has a value, the grid is rebuilt
    from the bins with :func:`time_warp`. Until then the ``initial`` grid (a checkpoint's
    measured ``time_grid``, or uniform time) is used. Everything is plain tensors saved by
    :meth:`state_dict`, so a resumed run draws exactly the times it would have drawn.

    Args:
        initial: ``[G]`` ascending times from 0 to 1, or None for uniform time.
        bins: bins of the running loss curve.
        momentum: EMA factor of a bin's loss per observed window.
        refresh_every: batches between grid rebuilds.
    """

    def __init__(
        self,
        initial: list[float] | None = None,
        *,
        bins: int = 32,
        momentum: float = 0.98,
        refresh_every: int = 50,
    ) -> None:
        self.bins, self.momentum, self.refresh_every = bins, momentum, refresh_every
        self.grid = torch.tensor(
            initial if initial else [i / (GRID_POINTS - 1) for i in range(GRID_POINTS)],
            dtype=torch.float64,
        )
        self.loss = torch.zeros(bins, dtype=torch.float64)
        self.seen = torch.zeros(bins, dtype=torch.int64)
        self.batches = 0

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """Times ``[B]`` float32 for uniform draws ``u [B]`` in ``[0, 1]``."""
        return warped(self.grid, u)

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """File windows' mean losses ``[B]`` under their times ``t [B]``; rebuild when due."""
        t = t.detach().to("cpu", torch.float64)
        losses = losses.detach().to("cpu", torch.float64)
        for b, value in zip(self.bin_of(t).tolist(), losses.tolist(), strict=True):
            if self.seen[b] == 0:
                self.loss[b] = value
            else:
                self.loss[b] += (1 - self.momentum) * (value - self.loss[b])
            self.seen[b] += 1
        self.batches += 1
        if self.batches % self.refresh_every == 0 and bool((self.seen > 0).all()):
            self.grid = torch.tensor(time_warp(*self.curve()), dtype=torch.float64)

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        """The bin index ``[B]`` int64 of times ``t [B]``."""
        return (t * self.bins).long().clamp(0, self.bins - 1)

    def curve(self) -> tuple[list[float], list[float]]:
        """``(times, losses)``: the bins' centres between the ends 0 and 1 and their losses
        (the ends take the first and last bin's loss)."""
        centres = ((torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins).tolist()
        losses = self.loss.tolist()
        return [0.0, *centres, 1.0], [losses[0], *losses, losses[-1]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid.clone(),
            "loss": self.loss.clone(),
            "seen": self.seen.clone(),
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grid = state["grid"].clone()
        self.loss = state["loss"].clone()
        self.seen = state["seen"].clone()
        self.batches = int(state["batches"])
