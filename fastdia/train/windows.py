"""Training windows cut from longer sequences, with the base-model states before them.

A denoiser that reads the base model (``DenoiserConfig.prefix_states = M``) trains on
windows of ``L`` tokens cut at a random offset from the longer sequences of a dataset
made with ``make-data --states``; for each window it reads the states of the ``M`` tokens
right before its first noisy position (the window's offset plus its clean prefix), as
the block loop gives them at sampling time (:mod:`fastdia.window`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdia.errors import ConfigError


@dataclass
class WindowStates:
    """The base-model states around a batch of windows cut from longer sequences.

    Attributes:
        seq: ``[B, S, d]`` (float16 as stored, or any float) the states of every
            position of each window's whole sequence.
        offset: ``[B]`` int64, where each window starts in its sequence.
    """

    seq: torch.Tensor
    offset: torch.Tensor

    def before(
        self, prefix: torch.Tensor | int, count: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The states of the ``count`` tokens before position ``offset + prefix`` of each
        sequence (``prefix``: an int or ``[B]`` int64, the window's clean prefix).

        Returns ``(states [B, count, d] float32, mask [B, count] bool)`` on ``device``;
        a position before the sequence's start has a zero state and mask False.
        """
        end = self.offset + torch.as_tensor(prefix, dtype=torch.int64)
        pos = end[:, None] - count + torch.arange(count)  # [B, count]
        valid = pos >= 0
        index = pos.clamp_min(0)[:, :, None].expand(-1, -1, self.seq.shape[2])
        states = torch.gather(self.seq, 1, index).float() * valid[..., None]
        return states.to(device), valid.to(device)

    def take(self, rows: int) -> WindowStates:
        """The first ``rows`` windows."""
        return WindowStates(self.seq[:rows], self.offset[:rows])


def crop_windows(
    gen: torch.Generator | None, ids: torch.Tensor, length: int, *, fixed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``length`` tokens from ``ids [B, S]``: ``(windows [B, length] int64,
    offsets [B] int64)``, one offset per row drawn uniformly from ``gen`` (with ``fixed``,
    the last ``length`` tokens of every row: a validation set the same in every call)."""
    batch, seq = ids.shape
    if seq < length:
        raise ConfigError(f"sequences of {seq} tokens cannot give windows of {length}")
    if fixed:
        offset = torch.full((batch,), seq - length, dtype=torch.int64)
    else:
        offset = torch.randint(seq - length + 1, (batch,), generator=gen)
    index = offset[:, None] + torch.arange(length)
    return torch.gather(ids, 1, index), offset
