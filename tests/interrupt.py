"""Helpers of the exact-resume tests: a training run interrupted part-way, as a user's
Ctrl-C would stop it, and the comparison of two runs' weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fastdia.train.common as common


def run_interrupted(
    monkeypatch: pytest.MonkeyPatch, train: Callable[[], Any], step: int = 4
) -> None:
    """Run ``train()`` with a KeyboardInterrupt raised when the optimiser asks for the
    learning rate of ``step`` (``fastdia.train.common.lr_at``); the patch is undone after."""
    real = common.lr_at

    def interrupt(cfg: Any, at: int) -> float:
        if at == step:
            raise KeyboardInterrupt
        return real(cfg, at)

    with monkeypatch.context() as patch:
        patch.setattr(common, "lr_at", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of ``a``'s state equals ``b``'s, bit for bit, in the same order."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
