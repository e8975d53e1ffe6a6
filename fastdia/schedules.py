"""Noise schedules and the per-step coefficient table.

Time is continuous, ``t`` in ``[0, 1]``; a schedule gives ``abar(t)`` (the signal
fraction of the variance-preserving forward process ``z_t = sqrt(abar_t) z_0 +
sqrt(1 - abar_t) eps``). Sampling in ``S`` steps walks a grid ``t_0 < ... < t_S = 1``
from ``t_S`` down to ``t_0``: by default ``t_i = i / S`` (landing on clean data, ``abar =
1``, after the last step). :func:`step_times` builds the grid from a measured time warp
(a denoiser's ``time_grid``: steps uniform in its loss, CDCD) and a stop level ``t* =
t_0 > 0`` (the run ends at ``abar(t*)``, for a decode that reads the noisy latent).

Every reverse step of every sampler is one linear combination (docs/design.md §1)::

    z' = a * z + b * eps_hat + c * lambda * grad h(z) + s * zeta,   zeta ~ N(0, I)

and the table holds ``(a, b, c, s)`` per row, computed once in float64 and stored in
float32 on the device. Notation below: ``abar``/``abar_p`` the signal fractions at the
row's input and output levels, ``alpha = abar / abar_p`` and ``beta = 1 - alpha`` the
per-step quantities.

``ddpm`` (Ho et al. 2020, ancestral; guidance as classifier guidance, Dhariwal & Nichol)::

    a = 1 / sqrt(alpha), b = -beta / (sqrt(alpha) sqrt(1 - abar)),
    c = s^2 = beta (1 - abar_p) / (1 - abar)            (posterior variance)

``ddim`` (Song et al. 2021, eta = 0; guidance shifts eps by -sqrt(1 - abar) lambda grad h)::

    a = sqrt(abar_p / abar), b = sqrt(1 - abar_p) - sqrt(abar_p (1 - abar) / abar),
    c = -b sqrt(1 - abar), s = 0

``dia`` (seed 001 §2.3/§2.5)::

    mu = (z - sigma eps) / alpha_s,  g = -eps / sigma + lambda grad h,
    z' = mu + eta Sigma^2 g + Sigma sqrt(2 eta) zeta

The seeds' alpha/sigma notation is inconsistent; this module binds it as follows:
``sigma = sqrt(1 - abar)`` (the marginal noise level, so ``-eps/sigma`` is the standard
score estimate), ``alpha_s = sqrt(abar / abar_p)`` (the per-step signal factor of the
seed's forward process), ``Sigma^2 = 1 - alpha_s^2 = beta`` (as the seed states). Then
``mu = sqrt(abar_p) x0_hat``, the denoised signal at the next level, and the Langevin
step ``D = eta Sigma^2`` is chosen as the unique positive value for which ``z'`` has
exactly the marginal noise variance ``1 - abar_p`` of the next level::

    D^2 / sigma^2 + 2 D = 1 - abar_p   =>   D = sigma (sqrt(sigma^2 + 1 - abar_p) - sigma)

(``eta = D / Sigma^2``; ``eta_scale`` multiplies ``D``). Rewritten into the four
coefficients::

    a = 1 / alpha_s, b = -sigma / alpha_s - D / sigma, c = D, s = sqrt(2 D)

Langevin corrector rows (predictor-corrector, Song et al. 2021) at a fixed level with
step ``delta = 2 snr^2 sigma^2``: ``a = 1, b = -delta / sigma, c = delta,
s = sqrt(2 delta)``. They follow each predictor row except the last. Metropolis-adjusted
rows (MALA, :mod:`fastdia.mala`) have the same coefficients (their own ``snr``) and follow
the corrector rows; the sampler proposes with them and accepts or rejects the move.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdia.errors import ConfigError

SCHEDULES = ("linear", "cosine", "sqrt")
SAMPLERS = ("ddpm", "ddim", "dia")
ABAR_MIN = 1e-5

# linear: the DDPM betas 1e-4 .. 0.02 over 1000 steps, as a continuous-time integral
_LINEAR_T, _LINEAR_B0, _LINEAR_B1 = 1000.0, 1e-4, 2e-2
_COSINE_S = 0.008
_SQRT_S = 1e-4


def check_choice(value: str, known: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is in ``known``; else raise ConfigError listing them."""
    if value not in known:
        raise ConfigError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    return value


def check_langevin_rows(steps: Any, snr: Any, name: str) -> None:
    """A ConfigError unless ``steps`` is an integer >= 0 and ``snr`` a finite number > 0
    (the settings ``{name}_steps`` and ``{name}_snr`` of corrector or MALA rows)."""
    bad_steps = isinstance(steps, bool) or not isinstance(steps, int) or steps < 0
    bad_snr = (
        isinstance(snr, bool)
        or not isinstance(snr, (int, float))
        or not math.isfinite(snr)
        or snr <= 0
    )
    if bad_steps or bad_snr:
        raise ConfigError(
            f"{name}_steps must be an integer >= 0 and {name}_snr a finite number > 0, got "
            f"{steps!r} and {snr!r}"
        )


def alpha_bar(schedule: str, t: torch.Tensor) -> torch.Tensor:
    """Signal fraction ``abar(t)`` of ``schedule`` (float64, clamped to ``[1e-5, 1]``).

    Args:
        schedule: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
        t: times in ``[0, 1]``, any shape.
    """
    check_choice(schedule, SCHEDULES, "schedule")
    t = t.to(torch.float64)
    if schedule == "linear":
        log_abar = -_LINEAR_T * (_LINEAR_B0 * t + 0.5 * (_LINEAR_B1 - _LINEAR_B0) * t * t)
        abar = log_abar.exp()
    elif schedule == "cosine":
        f = torch.cos((t + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2
        abar = f / math.cos(_COSINE_S / (1 + _COSINE_S) * math.pi / 2) ** 2
    else:  # Diffusion-LM's sqrt schedule
        abar = 1 - torch.sqrt(t + _SQRT_S)
    return abar.clamp(ABAR_MIN, 1.0)


# column indices of StepTable.rows
A, B, C, S, SQRT_ABAR, SQRT_1M_ABAR, SQRT_ABAR_NEXT, SQRT_1M_ABAR_NEXT = range(8)


@dataclass
class StepTable:
    """The per-row coefficients of one sampling run.

    Attributes:
        t: ``[R]`` float32, the denoiser's time input of each row.
        rows: ``[R, 8]`` float32; columns ``a, b, c, s`` (the step), ``sqrt(abar)`` and
            ``sqrt(1 - abar)`` at the row's input level (eps/x0 conversion, clamping),
            and the same at the level the row lands on (prompt inpainting).
        predictor: per row, True for a predictor row, False for a corrector row.
        adjusted: per row, True for a Metropolis-adjusted corrector row (MALA; empty
            means none).
    """

    t: torch.Tensor
    rows: torch.Tensor
    predictor: list[bool]
    adjusted: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def coef(self) -> torch.Tensor:
        """``[R, 4]`` float32 ``(a, b, c, s)``."""
        return self.rows[:, :4]

    def to(self, device: torch.device | str) -> StepTable:
        return StepTable(self.t.to(device), self.rows.to(device), self.predictor, self.adjusted)

    def is_adjusted(self, r: int) -> bool:
        """Whether row ``r`` is a Metropolis-adjusted corrector row."""
        return bool(self.adjusted) and self.adjusted[r]


def _predictor(sampler: str, ab: float, ab_p: float, eta_scale: float) -> tuple[float, ...]:
    alpha = ab / ab_p
    beta = 1.0 - alpha
    sig = math.sqrt(1.0 - ab)
    if sampler == "ddpm":
        var = beta * (1.0 - ab_p) / (1.0 - ab)
        return 1 / math.sqrt(alpha), -beta / (math.sqrt(alpha) * sig), var, math.sqrt(var)
    if sampler == "ddim":
        b = math.sqrt(1.0 - ab_p) - math.sqrt(ab_p * (1.0 - ab) / ab)
        return math.sqrt(ab_p / ab), b, -b * sig, 0.0
    alpha_s = math.sqrt(alpha)
    # sig * (sqrt(sig^2 + 1 - ab_p) - sig), written without the cancellation that made it
    # -5e-17 (and its sqrt a domain error) on a last step to ab_p = 1 (cosine schedule)
    d = eta_scale * sig * (1.0 - ab_p) / (math.sqrt(sig * sig + 1.0 - ab_p) + sig)
    return 1 / alpha_s, -sig / alpha_s - d / sig, d, math.sqrt(2 * d)


def check_stop(stop: float) -> float:
    """Return ``stop`` if it is a level in ``[0, 1)``; else raise ConfigError."""
    if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 <= stop < 1:
        raise ConfigError(
            f"the stop level t* must be a number in [0, 1) (0: denoise to clean data), got {stop!r}"
        )
    return float(stop)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the points ``(xp, fp)`` (``[G]``, ``xp`` ascending)
    at ``x`` (any shape); extrapolates linearly from the end segments."""
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) / (x1 - x0).clamp_min(1e-12) * (f1 - f0)


def step_times(steps: int, warp: list[float] | None = None, stop: float = 0.0) -> list[float]:
    """The ``S + 1`` ascending times ``t_0 = stop < ... < t_S = 1`` of a run.

    Args:
        steps: predictor steps ``S >= 1``.
        warp: a measured time warp (``DenoiserConfig.time_grid``): ``[G]`` ascending
            times from 0 to 1 at evenly spaced quantiles of the warped coordinate; steps
            are spaced evenly in that coordinate. None or empty: evenly in ``t``.
        stop: the level ``t*`` the run ends at (0: clean data).
    """
    check_stop(stop)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not warp:
        return [stop + (1 - stop) * i / steps for i in range(steps + 1)]
    grid = torch.tensor(warp, dtype=torch.float64)
    knots = torch.linspace(0, 1, len(warp), dtype=torch.float64)
    u_stop = float(interp(torch.tensor([stop], dtype=torch.float64), grid, knots)[0])
    u = u_stop + (1 - u_stop) * torch.arange(steps + 1, dtype=torch.float64) / steps
    times = interp(u, knots, grid).tolist()
    times[0], times[-1] = stop, 1.0
    return times


def coefficient_table(
    schedule: str,
    sampler: str,
    steps: int,
    *,
    corrector_steps: int = 0,
    corrector_snr: float = 0.1,
    eta_scale: float = 1.0,
    times: list[float] | None = None,
    mh_steps: int = 0,
    mh_snr: float = 0.1,
) -> StepTable:
    """Build the coefficient table of a run (on the CPU; move it with ``.to``).

    Args:
        schedule: noise schedule name (:data:`SCHEDULES`).
        sampler: ``"ddpm"``, ``"ddim"`` or ``"dia"``.
        steps: number of predictor steps ``S >= 1``.
        corrector_steps: Langevin corrector rows after each predictor row but the last.
        corrector_snr: the corrector's signal-to-noise ratio ``r`` (step ``2 r^2 sigma^2``).
        eta_scale: multiplier of the ``dia`` Langevin step (1 keeps marginals exact).
        times: the ``S + 1`` ascending times of :func:`step_times` (default ``i / S``);
            ``times[0] == 0`` lands on clean data, ``times[0] > 0`` stops at that level.
        mh_steps: Metropolis-adjusted Langevin rows after each predictor row's corrector
            rows (all but the last predictor row); flagged in ``StepTable.adjusted``.
        mh_snr: their signal-to-noise ratio (step ``2 mh_snr^2 sigma^2``).

    Returns:
        A :class:`StepTable` of ``R = S + (corrector_steps + mh_steps) * (S - 1)`` rows.
    """
    check_choice(sampler, SAMPLERS, "sampler")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    check_langevin_rows(corrector_steps, corrector_snr, "corrector")
    check_langevin_rows(mh_steps, mh_snr, "mh")
    if not math.isfinite(eta_scale) or eta_scale <= 0:
        raise ConfigError(f"eta_scale must be a positive number, got {eta_scale!r}")
    if times is None:
        times = step_times(steps)
    if len(times) != steps + 1 or any(b <= a for a, b in itertools.pairwise(times)):
        raise ConfigError(f"times must be {steps + 1} strictly ascending levels")
    grid = torch.tensor(times, dtype=torch.float64)
    abar = alpha_bar(schedule, grid).tolist()
    if times[0] == 0:
        abar[0] = 1.0  # the last step lands on clean data
    t_rows, rows, predictor, adjusted = [], [], [], []
    for i in range(steps, 0, -1):
        ab, ab_p = abar[i], abar[i - 1]
        coef = _predictor(sampler, ab, ab_p, eta_scale)
        levels = (math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_p), math.sqrt(1 - ab_p))
        t_rows.append(times[i])
        rows.append((*coef, *levels))
        predictor.append(True)
        adjusted.append(False)
        if i > 1:
            sig = math.sqrt(1 - ab_p)
            level = (math.sqrt(ab_p), sig, math.sqrt(ab_p), sig)
            for count, snr, is_mh in (
                (corrector_steps, corrector_snr, False),
                (mh_steps, mh_snr, True),
            ):
                delta = 2 * snr**2 * sig * sig
                corr = (1.0, -delta / sig, delta, math.sqrt(2 * delta))
                for _ in range(count):
                    t_rows.append(times[i - 1])
                    rows.append((*corr, *level))
                    predictor.append(False)
                    adjusted.append(is_mh)
    return StepTable(
        t=torch.tensor(t_rows, dtype=torch.float32),
        rows=torch.tensor(rows, dtype=torch.float64).to(torch.float32),
        predictor=predictor,
        adjusted=adjusted,
    )
