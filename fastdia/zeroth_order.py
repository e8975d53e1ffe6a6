"""Zeroth-order guidance (seed 002 §2.3): the reward's gradient estimated from the reward
itself, for a reward no critic imitates (``SamplerConfig.guidance_estimator = "zo"``).

At every reverse step of a block, each row's x0 estimate at the block's ``K`` positions
``x`` (``[K, d]``, the denoiser's expected embedding) is perturbed by ``Q / 2``
antithetic pairs ``x ± sigma u_q`` (``u_q ~ N(0, I)``, drawn under the row's own seed, the
block and the step); each candidate is rounded to the nearest token among the
:data:`SHORTLIST` tokens nearest the unperturbed estimate at its position (a full-vocabulary
rounding of every candidate at every step would cost ``Q`` times the whole diffusion's
rounding), and the row's text so far plus those tokens is scored by the true reward ``r``
(any callable from texts to numbers). The estimate of the gradient of the
Gaussian-smoothed reward ``r_sigma(x) = E_u[r(round(x + sigma u))]`` is::

    g = 1 / (sigma Q) sum_q (r(x + sigma u_q) - r(x - sigma u_q)) u_q      (Q / 2 pairs)

unbiased for ``grad r_sigma`` (Nesterov & Spokoiny, 2017), and it replaces the critic's
gradient in the guided step (``z' = a z + b eps + c lambda g + s zeta``) at the block's
positions (zero elsewhere). The reward reads host text, so a run with it is eager (no CUDA
graph) and costs ``Q`` reward calls per row per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fastdia.errors import ConfigError
from fastdia.smc import score_texts

if TYPE_CHECKING:
    from fastdia.window import WindowDiffusion

GUIDANCE_ESTIMATORS = ("critic", "zo", "proposal")  # SamplerConfig.guidance_estimator
SHORTLIST = 64  # a candidate rounds among the tokens nearest the unperturbed estimate


def check_zero_order(estimator: str, samples: int, sigma: float) -> None:
    """A ConfigError unless ``estimator`` is known, ``samples`` an even integer >= 2 (the
    antithetic pairs) and ``sigma`` a finite number > 0."""
    if estimator not in GUIDANCE_ESTIMATORS:
        raise ConfigError(
            f"guidance_estimator must be one of {', '.join(GUIDANCE_ESTIMATORS)}, got {estimator!r}"
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2 or samples % 2:
        raise ConfigError(
            f"zo_samples must be an even integer >= 2 (antithetic pairs), got {samples!r}"
        )
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not math.isfinite(sigma)
        or sigma <= 0
    ):
        raise ConfigError(f"zo_sigma must be a finite number > 0, got {sigma!r}")


def antithetic_gradient(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, u: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``1 / (sigma Q) sum_q (f(x + sigma u_q) - f(x - sigma u_q)) u_q``.

    Args:
        f: maps ``[2P, B, ...]`` points to ``[2P, B]`` values (the ``P`` plus points, then
            the ``P`` minus points, in ``u``'s order).
        x: ``[B, ...]`` the points (float32).
        u: ``[P, B, ...]`` the directions (``P = Q / 2`` pairs).
        sigma: the smoothing scale.

    Returns:
        ``[B, ...]`` float32, the estimate of ``grad E_u f(x + sigma u)`` at every row.
    """
    pairs = u.shape[0]
    values = f(torch.cat([x[None] + sigma * u, x[None] - sigma * u])).float()
    diff = (values[:pairs] - values[pairs:]).to(u.device)  # [P, B]
    shape = diff.shape + (1,) * (u.dim() - 2)
    return (diff.view(shape) * u).sum(0) / (2 * sigma * pairs)


def nearest_tokens(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: int
) -> torch.Tensor:
    """The ``size`` best token ids of each point of ``x [..., d]`` under the rounding score
    ``<weight_v, x> + bias_v`` (``round_to_vocab``'s): ``[..., size]`` int64."""
    scores = x @ weight.float().T
    if bias is not None:
        scores = scores + bias
    return scores.topk(min(size, weight.shape[0]), dim=-1).indices


def round_among(
    points: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Round each point among its own candidate tokens: ``points [Q, B, K, d]``, candidates
    ``ids [B, K, M]`` with their embedding rows ``rows [B, K, M, d]`` and rounding bias
    ``[B, K, M]`` (or None) -> ``[Q, B, K]`` int64, the best candidate's id (ties to the
    first candidate)."""
    scores = torch.einsum("qbkd,bkmd->qbkm", points, rows)
    if bias is not None:
        scores = scores + bias
    best = scores.argmax(dim=-1)  # [Q, B, K]
    return ids.expand(points.shape[0], *ids.shape).gather(-1, best[..., None])[..., 0]


def step_directions(
    seeds: list[int], block: int, step: int, pairs: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """``[pairs, B, *shape]`` standard normal directions, row ``b``'s drawn under its own
    seed, the block and the step alone (so a row's text does not depend on its batch)."""
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + block * 1_009 + step * 7_919 + 12_345) % 2**63
        )
        rows.append(torch.randn((pairs, *shape), generator=gen))
    return torch.stack(rows, dim=1)


class ZerothOrderGuide:
    """The zeroth-order gradient of one block diffusion (see the module docstring).

    Args:
        diffusion: the :class:`~fastdia.window.WindowDiffusion` it guides (its state,
            window layout, rounding op and sampler: the reward, ``zo_samples`` and
            ``zo_sigma``).
    """

    def __init__(self, diffusion: WindowDiffusion) -> None:
        self.diffusion = diffusion
        sampler = diffusion.sampler
        assert sampler.reward is not None  # the Sampler checked
        self.reward: Callable[[list[str]], Any] = sampler.reward
        self.pairs = sampler.config.zo_samples // 2
        self.sigma = float(sampler.config.zo_sigma)
        # the run's prompt rows and chat flag (the plan sets them): what the reward reads
        self.reading: tuple[list[list[int]], bool] = ([], False)
        self._prefix: list[list[int]] = []
        self._seeds: list[int] = []
        self._block = 0

    def start_block(self) -> None:
        """Read what the reward reads of the rows' text so far (the prompt and the tokens
        generated, cut at an end token, as :attr:`SampleOutput.texts`), their seeds and
        the block's index from the shared buffers (once per block)."""
        st, (rows, chat) = self.diffusion.state, self.reading
        if len(rows) != st.tokens.shape[0]:  # a plan run without its prompts (a warm-up)
            rows = [[] for _ in range(st.tokens.shape[0])]
        self._prefix = st.read_so_far(rows, self.diffusion.sampler.special.stop, chat=chat)
        self._seeds = st.seeds.tolist()
        self._block = int(st.generated) // st.block

    def grad(self, x0: torch.Tensor, step: int) -> torch.Tensor:
        """The estimate at step ``step`` from the x0 estimate ``x0 [B, W, d]``: ``[B * W, d]``
        float32, zero outside the block."""
        d = self.diffusion
        at = d.at_block  # [B, K, d] int64: the block's window positions
        x = x0.gather(1, at)  # [B, K, d]
        shape = tuple(x.shape[1:])
        u = step_directions(self._seeds, self._block, step, self.pairs, shape).to(x.device)
        space, sampler = d.sampler.space, d.sampler

        near = nearest_tokens(x, space.weight, d.bias, SHORTLIST)  # [B, K, M]
        rows = space.weight[near].float()  # [B, K, M, d]
        bias = d.bias[near] if d.bias is not None else None

        def rewards(points: torch.Tensor) -> torch.Tensor:  # [2P, B, K, d] -> [2P, B]
            ids = round_among(points, near, rows, bias).tolist()
            texts = [space.decode(self._prefix[b] + row[b]) for row in ids for b in range(len(row))]
            got = score_texts(self.reward, texts, sampler.reward_name)
            return got.view(points.shape[0], points.shape[1])

        g = antithetic_gradient(rewards, x, u, self.sigma)
        total = torch.zeros_like(x0)
        total.scatter_(1, at, g)
        return total.view(-1, x0.shape[-1])
