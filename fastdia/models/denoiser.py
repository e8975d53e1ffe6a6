"""The time-conditioned bidirectional transformer denoiser ``eps_psi(z_t, t)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdia.errors import ConfigError
from fastdia.models.common import TimeMLP, batch_times
from fastdia.schedules import SCHEDULES, check_choice

PREDICTIONS = ("eps", "x0")


@dataclass
class DenoiserConfig:
    """Hyper-parameters of :class:`Denoiser`.

    Attributes:
        dim: embedding width ``d`` of the base model.
        max_length: the longest sequence ``L`` it accepts (learned positions).
        hidden: transformer width.
        layers: transformer layers.
        heads: attention heads (must divide ``hidden``).
        prediction: ``"eps"`` (noise) or ``"x0"`` (clean embedding) parametrisation.
        schedule: the noise schedule it was trained with.
        dropout: dropout in the transformer layers (training only).
    """

    dim: int
    max_length: int = 64
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    prediction: str = "eps"
    schedule: str = "sqrt"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.prediction, PREDICTIONS, "prediction")
        check_choice(self.schedule, SCHEDULES, "schedule")
        if min(self.dim, self.max_length, self.hidden, self.layers, self.heads) < 1:
            raise ConfigError(f"denoiser sizes must be positive: {self}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")


class Denoiser(nn.Module):
    """Bidirectional transformer over ``[B, L, d]`` noisy embeddings.

    ``forward(z, t)`` takes ``z [B, L, d]`` float32 and ``t`` (scalar or ``[B]``, in
    ``[0, 1]``) and returns ``[B, L, d]`` float32: the predicted noise, or the predicted
    clean ``z_0`` when ``config.prediction == "x0"``.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.in_proj = nn.Linear(config.dim, h)
        self.pos = nn.Parameter(torch.zeros(config.max_length, h))
        nn.init.normal_(self.pos, std=0.02)
        self.time = TimeMLP(h, h)
        layer = nn.TransformerEncoderLayer(
            h,
            config.heads,
            4 * h,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.out_proj = nn.Linear(h, config.dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        batch, length, dim = z.shape
        if length > self.config.max_length or dim != self.config.dim:
            raise ConfigError(
                f"denoiser takes at most {self.config.max_length} tokens of width "
                f"{self.config.dim}, got [{batch}, {length}, {dim}]"
            )
        tt = batch_times(t, batch, z.device)
        x = self.in_proj(z) + self.pos[:length] + self.time(tt)[:, None, :]
        return self.out_proj(self.norm(self.encoder(x)))
