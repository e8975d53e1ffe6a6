"""Pieces shared by the denoiser and the critics."""

from __future__ import annotations

import math

import torch
from torch import nn

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000 t, the usual DDPM range


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous times.

    Args:
        t: ``[B]`` (or ``[B, L]``, one time per position) times in ``[0, 1]`` (any
            float dtype).
        dim: embedding width (even).

    Returns:
        ``[*t.shape, dim]`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = (t.to(torch.float32) * TIME_SCALE)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    """``t [B] -> [B, out]`` (or ``[B, L] -> [B, L, out]``): sinusoidal features then a
    two-layer SiLU MLP."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.features = features
        self.net = nn.Sequential(nn.Linear(features, out), nn.SiLU(), nn.Linear(out, out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.features)
        return self.net(emb.to(self.net[0].weight.dtype))


def batch_times(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or ``[B]`` time to a ``[B]`` float32 tensor on ``device``
    (a ``[B, L]`` tensor of per-position times is returned as float32 on ``device``)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.dim() == 0 else t
