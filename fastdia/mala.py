"""Metropolis-adjusted Langevin (MALA) corrector rows: the Langevin corrector with an
accept / reject step, so that at its level the chain leaves the guided target exactly
invariant instead of carrying the unadjusted (ULA) step's bias.

At a fixed noise level ``t`` (``sigma = sqrt(1 - abar_t)``) the target of the block's
latent is ``pi(z) ∝ p_t(z) exp(lambda h(z))``, ``p_t`` the diffused data density (score
``s(z) = -eps_hat(z) / sigma`` from the denoiser) and ``h`` the critics' value. A row
proposes the corrector's move (the same coefficients as a Langevin corrector row of
:func:`fastdia.schedules.coefficient_table`, step ``delta = 2 snr^2 sigma^2``)::

    g(z) = s(z) + lambda grad h(z),   z' = z + delta g(z) + sqrt(2 delta) zeta

on the positions that are not context, and accepts it with probability ``min(1, alpha)``::

    log alpha = [log p_t(z') - log p_t(z)] + lambda (h(z') - h(z))
                - |z - z' - delta g(z')|^2 / (4 delta) + |z' - z - delta g(z)|^2 / (4 delta)

The denoiser gives the score, not the density, so ``log p_t(z') - log p_t(z)`` is the line
integral of the score from ``z`` to ``z'`` by the trapezoid rule, ``(s(z) + s(z')) . (z' -
z) / 2``: exact when the score is linear (a Gaussian), with an error of order ``|z' -
z|^3`` otherwise, and only as good as the learned score is a gradient field. The two
scores are the ones the proposal and its reverse need anyway, so a row costs two denoiser
and critic evaluations (one when the previous row was a MALA row at the same level and the
prompt is given clean: its accepted state's evaluation is reused).

Shapes: states ``[B, L, d]`` float32 (``B`` chains, each accepted or rejected as a whole),
``free`` ``[B, L, 1]`` (1 where a position moves), values ``[B]``.
"""

from __future__ import annotations

import math

import torch


def propose(
    z: torch.Tensor, drift: torch.Tensor, zeta: torch.Tensor, delta: float, free: torch.Tensor
) -> torch.Tensor:
    """The Langevin proposal ``z + free (delta drift + sqrt(2 delta) zeta)``: ``[B, L, d]``."""
    return z + free * (delta * drift + math.sqrt(2.0 * delta) * zeta)


def log_accept(
    z: torch.Tensor,
    proposal: torch.Tensor,
    score: tuple[torch.Tensor, torch.Tensor],
    drift: tuple[torch.Tensor, torch.Tensor],
    value: tuple[torch.Tensor, torch.Tensor],
    delta: float,
    free: torch.Tensor,
) -> torch.Tensor:
    """``log alpha`` of each chain's move (see the module docstring): ``[B]`` float32.

    Args:
        z, proposal: the current and proposed states ``[B, L, d]``.
        score: ``(s(z), s(z'))``, the data scores ``[B, L, d]`` (without the critics).
        drift: ``(g(z), g(z'))``, the full drifts ``[B, L, d]`` the proposals use.
        value: ``(lambda h(z), lambda h(z'))``, the guidance terms ``[B]``.
        delta: the Langevin step.
        free: ``[B, L, 1]``, 1 where a position moves, 0 at the (fixed) context.
    """
    step = (proposal - z) * free
    density = 0.5 * ((score[0] + score[1]) * step).flatten(1).sum(1)
    forward = ((step - delta * drift[0] * free) ** 2).flatten(1).sum(1)
    backward = ((-step - delta * drift[1] * free) ** 2).flatten(1).sum(1)
    return density + (value[1] - value[0]) + (forward - backward) / (4.0 * delta)


def accept(log_alpha: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Which chains accept: ``log u < log alpha`` with ``u = Phi(normal)`` uniform, from one
    standard normal per chain (fastdia's counter-based noise): ``[B]`` bool."""
    return torch.special.log_ndtr(normal) < log_alpha
