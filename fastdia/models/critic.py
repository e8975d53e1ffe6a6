"""Critics ``h_phi(z, t)``: small differentiable imitators of a reward.

Two kinds share one interface, ``forward(z, t) -> h [B]`` and
``value_and_grad(z, t) -> (h [B], grad [B, L, d])``:

* :class:`TokenLocalCritic` (the default, docs/design.md §1)::

      h(z) = mean_i  w2 . silu(W1 z_i + b1(t)) + b2

  ``b1(t) = b1 + TimeMLP(t)`` when time-conditioned. Its gradient needs no other token,
  ``grad_{z_i} h = W1^T (w2 * silu'(W1 z_i + b1(t))) / L``, which is what lets it fuse
  into the step kernel.
* :class:`ContextCritic`: a small bidirectional transformer, mean-pooled; its gradient
  comes from autograd.

And one that reads the base model, ``forward(z, t, states, states_mask)`` (the same
``value_and_grad`` with the states as keywords):

* :class:`ValueCritic` (``kind="value"``): a twist / value function, FUDGE-style. Its
  value is the expected reward of the *finished* text given the base model's states of
  the ``M`` tokens before a block and the block's noisy latent ``z [B, K, d]``; trained
  on base-model samples by regressing each whole sample's reward from every prefix and
  block at every noise level. Its gradient on the block points toward continuations that
  make the whole text score; it reads "not good" through the base model's states.
  Two forms: a small transformer over the states and the block (``layers >= 1``), or
  (``layers = 0``) the token-local form with a context-dependent hidden bias,
  ``h = mean_i w2 . silu(W1 z_i + U c + b1(t)) + v . c + b`` with ``c`` the mean of the
  (layer-normed) states: a per-token value that depends on the context, whose gradient
  stays a smooth mix of the rows of W1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdia.errors import ConfigError
from fastdia.models.common import TimeMLP, batch_times

CRITIC_KINDS = ("token_local", "context", "value")
CRITIC_TARGETS = ("reward", "logit")
_TIME_FEATURES = 64
_LOGIT_EPS = 1e-4


def critic_target(rewards: torch.Tensor, target: str) -> torch.Tensor:
    """The values a critic regresses: ``rewards`` themselves, or ``logit(rewards)``.

    ``"logit"`` is for rewards that are probabilities (``nontoxic``): a linear classifier's
    probability is a sigmoid of a score that is additive over words, so its logit is what
    a token-local critic (a mean over tokens) can fit; the rewards are clamped to
    ``[1e-4, 1 - 1e-4]`` first. Both targets rank samples alike, so guidance climbs the
    same reward; with ``"logit"``, lambda is in logit units.
    """
    if target == "reward":
        return rewards.float()
    if target == "logit":
        return torch.logit(rewards.double().clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)).float()
    raise ConfigError(f"unknown critic target {target!r}; known: {', '.join(CRITIC_TARGETS)}")


@dataclass
class CriticConfig:
    """Hyper-parameters of a critic.

    Attributes:
        dim: embedding width ``d``.
        kind: ``"token_local"``, ``"context"`` or ``"value"``.
        hidden: hidden width (MLP units, or transformer width).
        time_conditioned: whether ``t`` enters (through the hidden bias, or added tokens).
        reward: the reward spec it imitates (e.g. ``"sentiment"``).
        target: what its output estimates: ``"reward"``, or ``"logit"`` of a reward that
            is a probability (see :func:`critic_target`).
        layers, heads, max_length: the context and value critics' transformer (ignored
            otherwise; a value critic's ``max_length`` is the longest block it scores, and
            ``layers = 0`` gives it the token-local form with a context bias).
        prefix_states: ``M``, the base-model states a value critic reads before its block.
        state_dim: their width (the base model's hidden size).
        metrics: held-out fidelity figures recorded by training (e.g. Spearman).
    """

    dim: int
    kind: str = "token_local"
    hidden: int = 128
    time_conditioned: bool = True
    reward: str = ""
    target: str = "reward"
    layers: int = 2
    heads: int = 4
    max_length: int = 64
    prefix_states: int = 0
    state_dim: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def reads_states(self) -> bool:
        """Whether the critic reads base-model states (a value critic)."""
        return self.kind == "value"

    def __post_init__(self) -> None:
        if self.kind not in CRITIC_KINDS:
            raise ConfigError(
                f"unknown critic kind {self.kind!r}; known: {', '.join(CRITIC_KINDS)}"
            )
        if self.target not in CRITIC_TARGETS:
            raise ConfigError(
                f"unknown critic target {self.target!r}; known: {', '.join(CRITIC_TARGETS)}"
            )
        if min(self.dim, self.hidden) < 1:
            raise ConfigError(f"critic sizes must be positive: {self}")
        if self.layers < 0 or (self.layers == 0 and self.kind != "value"):
            raise ConfigError(f"layers must be >= 1 (0 only for a value critic), got {self.layers}")
        if self.kind != "token_local" and self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if (self.kind == "value") != (self.prefix_states > 0 and self.state_dim > 0):
            raise ConfigError(
                "a value critic reads base-model states (prefix_states > 0 and state_dim > 0); "
                f"other kinds read none: got kind={self.kind!r}, prefix_states="
                f"{self.prefix_states}, state_dim={self.state_dim}"
            )


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    """``d/dx silu(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))``."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


class TokenLocalCritic(nn.Module):
    """``h(z) = mean_i w2 . silu(W1 z_i + b1(t)) + b2`` over ``z [B, L, d]``."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.dim, config.hidden)
        self.time = TimeMLP(_TIME_FEATURES, config.hidden) if config.time_conditioned else None
        self.w2 = nn.Parameter(torch.randn(config.hidden) / config.hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(()))

    def hidden_bias(self, t: torch.Tensor) -> torch.Tensor:
        """``b1(t)``: ``[R]`` times in, ``[R, H]`` float32 out."""
        bias = self.fc1.bias.expand(t.shape[0], -1)
        return bias + self.time(t) if self.time is not None else bias

    def _pre(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        tt = batch_times(t, z.shape[0], z.device)
        return z @ self.fc1.weight.T + self.hidden_bias(tt)[:, None, :]

    def forward(self, z: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``z [B, L, d]`` float32, ``t`` scalar or ``[B]`` -> ``h [B]`` float32."""
        return (nn.functional.silu(self._pre(z, t)) @ self.w2).mean(dim=1) + self.b2

    def value_and_grad(
        self, z: torch.Tensor, t: torch.Tensor | float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B], grad_z h [B, L, d])`` in closed form (no autograd)."""
        with torch.no_grad():
            pre = self._pre(z, t)
            h = (nn.functional.silu(pre) @ self.w2).mean(dim=1) + self.b2
            grad = (silu_grad(pre) * self.w2) @ self.fc1.weight / z.shape[1]
        return h, grad


class ContextCritic(nn.Module):
    """A small bidirectional transformer critic over ``z [B, L, d]``, mean-pooled."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.in_proj = nn.Linear(config.dim, h)
        self.pos = nn.Parameter(torch.zeros(config.max_length, h))
        nn.init.normal_(self.pos, std=0.02)
        self.time = TimeMLP(_TIME_FEATURES, h) if config.time_conditioned else None
        layer = nn.TransformerEncoderLayer(
            h, config.heads, 2 * h, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 1))

    def forward(self, z: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``z [B, L, d]`` float32, ``t`` scalar or ``[B]`` -> ``h [B]`` float32."""
        batch, length, _ = z.shape
        if length > self.config.max_length:
            raise ConfigError(
                f"context critic takes at most {self.config.max_length} tokens, got {length}"
            )
        x = self.in_proj(z) + self.pos[:length]
        if self.time is not None:
            x = x + self.time(batch_times(t, batch, z.device))[:, None, :]
        return self.head(self.encoder(x).mean(dim=1)).squeeze(-1)

    def value_and_grad(
        self, z: torch.Tensor, t: torch.Tensor | float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B], grad_z h [B, L, d])`` by autograd."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            h = self.forward(zz, t)
            (grad,) = torch.autograd.grad(h.sum(), zz)
        return h.detach(), grad


class ValueCritic(nn.Module):
    """The value of a block given the base model's states before it (see the module
    docstring): a small transformer over ``[M projected states ; K block positions]``
    (missing states masked out), mean-pooled over the block."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.state_norm = nn.LayerNorm(config.state_dim)
        self.time = TimeMLP(_TIME_FEATURES, h) if config.time_conditioned else None
        if config.layers == 0:  # the token-local form with a context bias
            self.fc1 = nn.Linear(config.dim, h)
            self.context = nn.Linear(config.state_dim, h, bias=False)
            self.w2 = nn.Parameter(torch.randn(h) / h**0.5)
            self.head = nn.Sequential(nn.Linear(config.state_dim, 1))  # v . c + b
            return
        self.in_proj = nn.Linear(config.dim, h)
        self.pos = nn.Parameter(torch.zeros(config.max_length, h))
        self.state_proj = nn.Linear(config.state_dim, h)
        self.state_pos = nn.Parameter(torch.zeros(config.prefix_states, h))
        for p in (self.pos, self.state_pos):
            nn.init.normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            h, config.heads, 2 * h, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 1))

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float = 0.0,
        *,
        states: torch.Tensor | None = None,
        states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z [B, K, d]`` float32 (the block), ``t`` scalar or ``[B]``, ``states
        [B, M, state_dim]``, ``states_mask [B, M]`` bool (None: all exist) -> ``[B]``."""
        batch, length, _ = z.shape
        m, width = self.config.prefix_states, self.config.state_dim
        if length > self.config.max_length:
            raise ConfigError(
                f"value critic scores blocks of at most {self.config.max_length} tokens, got "
                f"{length}"
            )
        if states is None or tuple(states.shape) != (batch, m, width):
            got = None if states is None else tuple(states.shape)
            raise ConfigError(
                f"a value critic reads the base model's states before the block: pass "
                f"states [{batch}, {m}, {width}], got {got}"
            )
        if self.config.layers == 0:
            return self._token_local(z, t, states, states_mask)
        x = self.in_proj(z) + self.pos[:length]
        if self.time is not None:
            x = x + self.time(batch_times(t, batch, z.device))[:, None, :]
        s = self.state_proj(self.state_norm(states.to(x.dtype))) + self.state_pos
        ignore = None
        if states_mask is not None:
            ignore = nn.functional.pad(~states_mask.to(torch.bool), (0, length), value=False)
        out = self.encoder(torch.cat([s, x], dim=1), src_key_padding_mask=ignore)
        return self.head(out[:, m:].mean(dim=1)).squeeze(-1)

    def _token_local(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float,
        states: torch.Tensor,
        states_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The ``layers = 0`` form (the module docstring): ``[B]``. Its last layer is
        ``w2`` and ``head`` (what :func:`fastdia.train.critic.fold_affine` rescales)."""
        normed = self.state_norm(states.to(z.dtype))
        keep = torch.ones(normed.shape[:2], device=z.device, dtype=z.dtype)
        if states_mask is not None:
            keep = states_mask.to(z.dtype)
        ctx = (normed * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        bias = self.fc1.bias + self.context(ctx)  # [B, H]
        if self.time is not None:
            bias = bias + self.time(batch_times(t, z.shape[0], z.device))
        pre = z @ self.fc1.weight.T + bias[:, None, :]
        value = (nn.functional.silu(pre) @ self.w2).mean(dim=1)
        return value + self.head(ctx).squeeze(-1)

    def value_and_grad(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float = 0.0,
        *,
        states: torch.Tensor | None = None,
        states_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B], grad_z h [B, K, d])`` by autograd."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            h = self.forward(zz, t, states=states, states_mask=states_mask)
            (grad,) = torch.autograd.grad(h.sum(), zz)
        return h.detach(), grad


def build_critic(config: CriticConfig) -> TokenLocalCritic | ContextCritic | ValueCritic:
    """The critic module of ``config.kind``."""
    if config.kind == "token_local":
        return TokenLocalCritic(config)
    return ValueCritic(config) if config.kind == "value" else ContextCritic(config)
