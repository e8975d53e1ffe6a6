"""What both trainers share: optimiser and schedule, EMA, exact-resume state, devices.

Resume is exact because nothing random depends on hidden generator state: every step
``s`` draws its batch, times, noise and dropout from generators seeded by ``(seed, s)``,
and the state file holds the model, EMA, optimiser and step. A state file is written
atomically (temporary name, fsync, rename), so an interrupted run leaves the previous
state intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdia.distributed import SINGLE, World
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import remove_stale_temporaries, write_atomic

log = logging.getLogger(__name__)

T_MIN = 1e-3  # smallest training time (t = 0 has no noise to predict)
TRAINING_DIR = "training"  # resume states and histories, beside the model files


def state_path(out_dir: Path, stem: str) -> Path:
    """Where the resume state of model ``stem`` in checkpoint folder ``out_dir`` lives."""
    return Path(out_dir) / TRAINING_DIR / f"{stem}_state.pt"


def history_path(out_dir: Path, stem: str) -> Path:
    """Where the training history (JSON) of model ``stem`` lives."""
    return Path(out_dir) / TRAINING_DIR / f"{stem}_history.json"


def resumed_history(out_dir: Path, stem: str, step: int) -> list[dict[str, Any]]:
    """The stored history of model ``stem`` up to ``step`` (the step a run resumes at;
    entries written after its state are dropped); empty without a history file."""
    path = history_path(out_dir, stem)
    if not path.is_file():
        return []
    return [h for h in json.loads(path.read_text()) if h["step"] <= step]


@dataclass
class OptimConfig:
    """Optimiser and run settings shared by the trainers.

    Attributes:
        steps: optimiser steps in all.
        batch_size: windows per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps, then cosine decay to ``lr * final_lr_frac``.
        final_lr_frac: the learning rate at the end, as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 disables clipping).
        ema: EMA decay of the weights that are saved for sampling (0 disables EMA).
        seed: seed of every random draw (batches, times, noise, dropout, init).
        save_every: write the checkpoint and the resume state every this many steps.
        val_every: validate every this many steps.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 100
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    save_every: int = 500
    val_every: int = 250

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1 or self.val_every < 1:
            raise ConfigError("steps, batch_size, save_every and val_every must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): warm-up then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.final_lr_frac
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``: a pure function of ``(seed, step)``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


class EMA:
    """Exponential moving average of a module's floating parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``module``."""
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(saved)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 mixed precision on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Optimisation:
    """AdamW with the schedule of ``cfg``, clipping, EMA, and the exact-resume state.

    Args:
        module: the model being trained (its parameters are optimised in place).
        cfg: optimiser settings.
        state_file: where :meth:`save` writes and :meth:`resume` reads the state.
        identity: the run settings a resumed state must match (see :func:`identity_of`).
    """

    def __init__(
        self,
        module: nn.Module,
        cfg: OptimConfig,
        state_file: Path,
        identity: dict[str, Any],
        world: World = SINGLE,
    ) -> None:
        self.module, self.cfg, self.state_file, self.identity = module, cfg, state_file, identity
        self.world = world
        self.opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(module, cfg.ema) if cfg.ema else None
        self.step = 0
        self.tracked: dict[str, Any] = {}

    def parallel(self, forward: nn.Module) -> nn.Module:
        """``forward`` (a module over :attr:`module`'s parameters whose forward computes this
        step's loss terms) under ``DistributedDataParallel`` when the run has several
        ranks: backward then averages the gradients over ranks, so every rank steps with
        the same gradient and keeps the same weights. Itself on one process."""
        if not self.world.distributed:
            return forward
        from torch.nn.parallel import DistributedDataParallel

        # a step may leave some parameters out (the self-conditioning input, a clean batch)
        return DistributedDataParallel(forward, find_unused_parameters=True)

    def track(self, name: str, obj: Any) -> None:
        """Save and resume ``obj`` (with ``state_dict``/``load_state_dict``) with the run:
        training state beside the model's, e.g. a running time warp."""
        self.tracked[name] = obj

    def resume(self) -> int:
        """Load the saved state; returns the step to continue from."""
        state = load_state(self.state_file, self.identity)
        for folder in (self.state_file.parent, self.state_file.parent.parent):
            for path in remove_stale_temporaries(folder):
                log.info("removed %s, left by an interrupted save", path)
        device = next(self.module.parameters()).device
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        for name, obj in self.tracked.items():
            obj.load_state_dict(state.get("tracked", {})[name])
        self.step = state["step"]
        log.info("resuming at step %d", self.step)
        return self.step

    def update(self, loss: torch.Tensor) -> float:
        """Backward, clip, step at this step's learning rate, update the EMA.

        Returns the learning rate used.
        """
        lr = lr_at(self.cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.module)
        self.step += 1
        return lr

    def averaged(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which the module holds the weights to save (EMA if enabled)."""
        return self.ema.applied(self.module) if self.ema is not None else contextlib.nullcontext()

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights to save: the EMA, or the raw weights without EMA."""
        return self.ema.shadow if self.ema is not None else self.module.state_dict()

    def save(self) -> None:
        """Write the resume state atomically (rank 0 of a distributed run)."""
        if not self.world.is_main:
            return
        save_state(
            self.state_file,
            step=self.step,
            module=self.module,
            ema=self.ema,
            optimizer=self.opt,
            identity=self.identity,
            tracked={name: obj.state_dict() for name, obj in self.tracked.items()},
        )


def batch_draws(gen: torch.Generator, n: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's window indices ``[batch]`` and times ``t ~ U[T_MIN, 1]`` ``[batch]``."""
    idx = torch.randint(n, (batch_size,), generator=gen)
    t = torch.rand(batch_size, generator=gen) * (1 - T_MIN) + T_MIN
    return idx, t


def save_state(
    path: Path,
    *,
    step: int,
    module: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    identity: dict[str, Any],
    tracked: dict[str, Any] | None = None,
) -> None:
    """Write the resume state atomically (``tracked``: other training state by name)."""
    state = {
        "tracked": tracked or {},
        "step": step,
        "model": module.state_dict(),
        "ema": ema.shadow if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "identity": identity,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read the resume state, checking it belongs to the same run settings."""
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} does not exist; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise CheckpointError(
            f"--resume: {path} is corrupt ({exc}); start without --resume"
        ) from exc
    if state.get("identity") != identity:
        diff = sorted(
            k
            for k in set(identity) | set(state.get("identity", {}))
            if identity.get(k) != state.get("identity", {}).get(k)
        )
        raise CheckpointError(
            f"--resume: {path} was written by a run with other settings ({', '.join(diff)}); "
            "resume with the same settings or start a new output folder"
        )
    return state


def identity_of(*configs: Any, **extra: Any) -> dict[str, Any]:
    """The settings that must not change across a resume, as plain data."""
    out: dict[str, Any] = {}
    for cfg in configs:
        out.update(
            {
                f"{type(cfg).__name__}.{k}": v
                for k, v in asdict(cfg).items()
                if k not in ("save_every", "val_every", "metrics")
            }
        )
    out.update(extra)
    return out
