"""A reward-aware amortised proposal (seed 002 §2.5): a network that predicts the critics'
guiding gradient, so a guided step needs no critic backward.

For the rewards ``j = 1..R`` it was trained on, :class:`AmortisedProposal` maps a token's
noisy latent ``z_i`` (``[d]``) at time ``t`` to ``R`` vectors ``g_j(z_i, t)``, each trained
to match the per-token gradient of reward ``j``'s token-local critic,
``L grad_{z_i} h_j(z, t)`` (a token-local critic's gradient at a position reads only that
position, and its ``1 / L`` factor is left out so one network serves any window). The
guidance of a reward mixture ``sum_j w_j h_j`` is the same mixture of the heads::

    delta_psi(z, t, w)_i = sum_j w_j g_j(z_i, t) / L

so the reward enters as the weight vector ``w`` (the run's ``--reward`` spec) and a new
mixture needs no retraining. At sampling time (``guidance_estimator="proposal"``) the
heads are folded into one for the run's weights and the hidden bias is evaluated once per
row of the step table (:class:`FoldedProposal`), so a step costs three matrix products per
token, whose result the fused guided step reads as its gradient input in place of the
critic stack's closed-form gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdia.errors import ConfigError
from fastdia.models.common import TimeMLP, batch_times

_TIME_FEATURES = 64


@dataclass
class ProposalConfig:
    """Hyper-parameters of an amortised proposal.

    Attributes:
        dim: embedding width ``d``.
        rewards: the reward specs it predicts gradients for (one head each), in order;
            each is the ``config.reward`` of the token-local critic it imitates.
        hidden: hidden width of its two layers.
        metrics: held-out fidelity figures recorded by training.
    """

    dim: int
    rewards: list[str]
    hidden: int = 256
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if min(self.dim, self.hidden) < 1:
            raise ConfigError(
                f"proposal sizes must be positive: dim={self.dim}, hidden={self.hidden}"
            )
        if not self.rewards or len(set(self.rewards)) != len(self.rewards):
            raise ConfigError(
                f"a proposal needs one or more distinct rewards, got {list(self.rewards)!r}"
            )


@dataclass
class FoldedProposal:
    """A proposal's heads folded for one reward mixture, hidden biases per step-table row.

    Attributes:
        w_in: ``[H, d]`` float32.
        b_in: ``[R, H]`` float32 (one row per row of the step table; ``[H]`` after
            :meth:`row`).
        w_mid: ``[H, H]`` float32.
        b_mid: ``[H]`` float32.
        w_out: ``[d, H]`` float32, the heads' weights mixed by the reward weights.
        b_out: ``[d]`` float32.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_mid: torch.Tensor
    b_mid: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor

    def row(self, r: int) -> FoldedProposal:
        """The fold with the hidden bias of step-table row ``r`` only."""
        return FoldedProposal(
            self.w_in, self.b_in[r], self.w_mid, self.b_mid, self.w_out, self.b_out
        )


def proposal_grad(z: torch.Tensor, fold: FoldedProposal, seq_len: int) -> torch.Tensor:
    """The guiding gradient ``[N, d]`` float32 at ``z [N, d]`` (``N = B * seq_len``) from
    one row's fold (``b_in [H]``): ``sum_j w_j g_j(z_i, t) / seq_len``. Graph-safe (no
    host read, shapes fixed by ``z``)."""
    hidden = nn.functional.silu(torch.addmm(fold.b_in, z, fold.w_in.T))
    hidden = nn.functional.silu(torch.addmm(fold.b_mid, hidden, fold.w_mid.T))
    return torch.addmm(fold.b_out, hidden, fold.w_out.T).div_(seq_len)


class AmortisedProposal(nn.Module):
    """``g(z, t) [B, L, R, d]``: per token, one predicted critic gradient per reward."""

    def __init__(self, config: ProposalConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.hidden, config.dim
        self.fc_in = nn.Linear(d, h)
        self.time = TimeMLP(_TIME_FEATURES, h)
        self.fc_mid = nn.Linear(h, h)
        self.head = nn.Linear(h, d * len(config.rewards))

    def hidden_bias(self, t: torch.Tensor) -> torch.Tensor:
        """The first layer's bias at times ``t [T]``: ``[T, H]`` float32."""
        return self.fc_in.bias + self.time(t)

    def heads(self, z: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``z [B, L, d]`` float32, ``t`` scalar or ``[B]`` -> ``[B, L, R, d]`` float32: each
        reward's predicted per-token gradient ``L grad_{z_i} h_j``."""
        batch, length, dim = z.shape
        bias = self.hidden_bias(batch_times(t, batch, z.device))  # [B, H]
        hidden = nn.functional.silu(z @ self.fc_in.weight.T + bias[:, None, :])
        hidden = nn.functional.silu(self.fc_mid(hidden))
        return self.head(hidden).view(batch, length, len(self.config.rewards), dim)

    def forward(
        self, z: torch.Tensor, t: torch.Tensor | float, weights: torch.Tensor
    ) -> torch.Tensor:
        """``delta_psi(z, t, w)``: ``z [B, L, d]``, ``weights [R]`` (one per reward of
        ``config.rewards``) -> the guiding gradient ``[B, L, d]`` float32 (``1 / L``
        included)."""
        return torch.einsum("blrd,r->bld", self.heads(z, t), weights) / z.shape[1]

    def reward_weights(self, guide: Sequence[tuple[str, float]]) -> torch.Tensor:
        """The weight vector ``[R]`` float32 of a reward mixture given as ``(spec, weight)``
        pairs (the run's ``--reward``); a reward the proposal has no head for is a
        ConfigError naming it and the fix."""
        rewards = self.config.rewards
        missing = [name for name, _ in guide if name not in rewards]
        if missing:
            raise ConfigError(
                f"the amortised proposal has no head for {', '.join(missing)} (its rewards: "
                f"{', '.join(rewards)}); train one with `fastdia train-proposal --rewards "
                f"{','.join(dict.fromkeys([*rewards, *missing]))}` or guide with the critics "
                "(--guidance-estimator critic)"
            )
        weights = torch.zeros(len(rewards))
        for name, weight in guide:
            weights[rewards.index(name)] += weight
        return weights

    @torch.no_grad()
    def fold(self, weights: torch.Tensor, t: torch.Tensor) -> FoldedProposal:
        """The heads mixed by ``weights [R]`` and the hidden bias at each of the step
        table's times ``t [T]``: a :class:`FoldedProposal` on the proposal's device."""
        h, d = self.config.hidden, self.config.dim
        w = weights.to(self.head.weight).view(-1, 1, 1)
        w_out = (self.head.weight.view(-1, d, h) * w).sum(0)
        b_out = (self.head.bias.view(-1, d) * w[:, :, 0]).sum(0)
        return FoldedProposal(
            self.fc_in.weight.float().contiguous(),
            self.hidden_bias(t.to(self.fc_in.weight.device)).float().contiguous(),
            self.fc_mid.weight.float().contiguous(),
            self.fc_mid.bias.float(),
            w_out.float().contiguous(),
            b_out.float(),
        )
