"""Twisted sequential Monte Carlo over blocks (``SamplerConfig.particles > 1``).

The LM decode draws each token from a proposal ``q``: the base model at the decode's
temperature ``T``, times the diffusion latent's likelihood, times the critics' per-token
tilt. Alone it samples from none of these exactly. With particles it becomes the proposal
of an SMC sampler whose target, per row's continuation ``x_1..x_n``, is::

    pi(x) ∝ prod_i p_T(x_i | x_<i) exp(beta u(x_i))

``p_T`` the base model's next-token distribution at temperature ``T`` (banned tokens
removed), ``u`` the token-local critics' per-token values (:func:`fastdia.decode.
token_values`) and ``beta`` the decode's tilt weight (``tilt x guidance / W``): the tilted
target the decode aims at, without the latent's pull (nor tilt-once's or a horizon's edits
of the tilt, where set): the weights correct those.
The twist after ``j`` blocks is the tilt of the tokens so far (exact for this additive
target), so each drawn token adds the incremental log-weight::

    log p_T(x_i) + beta u(x_i) - log q(x_i)

Each group of ``particles`` consecutive rows (one prompt) is one particle system: after
every block the rows' log-weights give the group's effective sample size; a group under
``ess_threshold x particles`` is resampled (systematic resampling; the rows' tokens, KV
cache, hidden states and per-row tilt are gathered, and the children take fresh seeds so
that they diverge). At the end every group is resampled once more, so the returned rows
are equally weighted draws, and the estimate of each group's log normalising constant
``log Z`` (of ``pi`` relative to ``p_T``) is reported with the ESS per block.

**The true reward** (``SamplerConfig.smc_reward_weight = W > 0``, the sampler's
``reward``, any callable from texts to numbers): the target becomes::

    pi_r(x) ∝ p_T(x) exp(W r(x))

with ``r`` the reward of the finished text (what ``SampleOutput.texts`` holds). With the
critic twist the last block's weight swaps the twist for the reward: it adds
``W r(x) - beta sum_i u(x_i)`` (the row's whole twist, :attr:`DecodePlan.twist`). With the
reward twist (``smc_twist="reward"``) the decode's weights leave the tilt out (target
``p_T``) and every block adds ``W (r(x_1..j) - r(x_1..j-1))``, the reward of the text so
far against its value a block earlier: no critic is needed, so any reward steers.

Resampling reads the weights back to the host: an SMC run is eager (no CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdia.errors import ConfigError

MAX_SEED = 2**31


def check_particles(particles: int, ess_threshold: float) -> None:
    """A ConfigError unless ``particles`` is an int >= 1 and ``ess_threshold`` in (0, 1]."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ConfigError(
            f"particles must be an integer >= 2 for SMC (1: no SMC), got {particles!r}"
        )
    if not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
        raise ConfigError(f"ess_threshold must be in (0, 1], got {ess_threshold!r}")


SMC_TWISTS = ("critic", "reward")  # SamplerConfig.smc_twist


def check_smc_reward(twist: str, weight: float, particles: int) -> None:
    """A ConfigError unless ``twist`` is one of :data:`SMC_TWISTS` and ``weight`` a finite
    number >= 0 that is positive for the reward twist, and either is used with SMC only."""
    if twist not in SMC_TWISTS:
        raise ConfigError(f"smc_twist must be one of {', '.join(SMC_TWISTS)}, got {twist!r}")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ConfigError(f"smc_reward_weight must be a finite number >= 0, got {weight!r}")
    if twist == "reward" and not weight:
        raise ConfigError(
            "smc_twist='reward' weighs particles by W x the reward of their text so far: "
            "give W > 0 (--smc-reward-weight)"
        )
    if particles < 2 and (weight or twist != "critic"):
        raise ConfigError(
            "smc_twist and smc_reward_weight weigh SMC's particles: give particles >= 2 "
            "(--particles)"
        )


def score_texts(reward: Callable[[list[str]], Any], texts: list[str], name: str) -> torch.Tensor:
    """``reward(texts)`` as ``[B]`` float64 on the CPU, or a ConfigError naming the reward
    ``name`` and the first bad row (a reward must give one finite number per text)."""
    got = reward(texts)
    try:
        scores = torch.as_tensor(got, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"reward {name!r} must return one number per text, got {type(got).__name__}: {exc}"
        ) from None
    if scores.shape[0] != len(texts):
        raise ConfigError(
            f"reward {name!r} returned {scores.shape[0]} scores for {len(texts)} texts: it "
            "must return one number per text"
        )
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ConfigError(
            f"reward {name!r} scored row {row} as {scores[row].item()} (text {texts[row]!r}): "
            "a reward must be a finite number"
        )
    return scores


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """``(sum w)^2 / sum w^2`` of each group's weights ``exp(log_w)``: ``[G, P]`` -> ``[G]``."""
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, dim=1) - torch.logsumexp(2 * log_w, dim=1))


def systematic_resample(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Systematic resampling of each group: ``log_w [G, P]`` and one uniform ``u [G]`` in
    ``[0, 1)`` per group -> parent indices ``[G, P]`` int64 within the group (particle
    ``k`` takes the parent whose cumulative weight first exceeds ``(k + u) / P``)."""
    count = log_w.shape[1]
    w = torch.softmax(log_w.double(), dim=1)
    cum = torch.cumsum(w, dim=1)
    cum[:, -1] = 1.0  # no index past the end from float rounding
    points = (torch.arange(count, dtype=torch.float64) + u.double()[:, None]) / count
    return torch.searchsorted(cum, points.contiguous(), right=True).clamp_(max=count - 1)


def _uniform(seed: int, block: int) -> float:
    """A deterministic uniform in ``[0, 1)`` for a group's resampling at a block."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + block * 7_919 + 17) % 2**63)
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def child_seed(parent: int, row: int, block: int) -> int:
    """The seed a resampled row takes: a mix of its parent's seed, its row and the block,
    so that children of one parent draw different noise from then on."""
    return (parent * 1_103_515_245 + row * 12_345 + block * 2_654_435_761 + 1) % MAX_SEED


@dataclass
class Particles:
    """The SMC state of one run: ``groups x particles`` rows, their log-weights since the
    last resampling, each group's running ``log Z`` estimate and the ESS per block.

    Attributes:
        particles: rows per group ``P``.
        threshold: resample a group when its ESS falls under ``threshold x P``.
        log_w: ``[B]`` float64 on the decode's device, the incremental log-weights since
            each row's group was last resampled (the decode adds to it).
        log_z: ``[G]`` float64 on the CPU.
        ess: per block, ``[G]`` ESS values before any resampling (lists of floats).
        resampled: per block, which groups were resampled.
    """

    particles: int
    threshold: float
    log_w: torch.Tensor
    log_z: torch.Tensor
    ess: list[list[float]] = field(default_factory=list)
    resampled: list[list[bool]] = field(default_factory=list)

    @classmethod
    def start(cls, log_w: torch.Tensor, particles: int, threshold: float) -> Particles:
        """The state of a run over the decode's per-row log-weights ``log_w [B]`` (zeroed
        here; the decode adds to them), in groups of ``particles`` rows."""
        rows = log_w.shape[0]
        if rows % particles:
            raise ConfigError(
                f"SMC needs a batch that is a multiple of particles={particles}, got {rows} "
                "rows: one group of particles per prompt"
            )
        log_w.zero_()
        return cls(particles, threshold, log_w, torch.zeros(rows // particles, dtype=torch.float64))

    @property
    def groups(self) -> int:
        return self.log_z.shape[0]

    def step(self, block: int, seeds: list[int], *, final: bool = False) -> torch.Tensor | None:
        """After block ``block``: record each group's ESS and resample those under the
        threshold (every group when ``final``). Returns the rows' parents ``[B]`` int64 on
        the CPU (None when no group resamples); the caller gathers the rows by them and
        gives them the seeds of :func:`child_seed` (final: no new seeds needed)."""
        log_w = self.log_w.cpu().view(self.groups, self.particles)
        ess = effective_sample_size(log_w)
        self.ess.append(ess.tolist())
        redo = (
            torch.ones_like(ess, dtype=torch.bool)
            if final
            else ess < self.threshold * self.particles
        )
        self.resampled.append(redo.tolist())
        if not bool(redo.any()):
            return None
        self.log_z += torch.where(
            redo, torch.logsumexp(log_w, dim=1) - math.log(self.particles), 0.0
        )
        u = torch.tensor([_uniform(seeds[g * self.particles], block) for g in range(self.groups)])
        local = systematic_resample(log_w, u)
        keep = torch.arange(self.particles).expand(self.groups, -1)
        local = torch.where(redo[:, None], local, keep)
        parents = (local + torch.arange(self.groups)[:, None] * self.particles).reshape(-1)
        self.log_w.view(self.groups, self.particles)[redo.to(self.log_w.device)] = 0.0
        return parents

    def summary(self) -> dict[str, object]:
        """What a run reports: ``log_z`` per group, ``ess`` per block and group (before
        resampling), ``resampled`` per block and group."""
        return {
            "particles": self.particles,
            "ess_threshold": self.threshold,
            "log_z": self.log_z.tolist(),
            "ess": self.ess,
            "resampled": self.resampled,
        }
