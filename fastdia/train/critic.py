"""Training a critic to imitate a (possibly non-differentiable) reward.

Labels are the true reward of each window's decoded text, computed once. The critic sees
the window's embeddings noised to a random level ``t`` (``z_t`` of the forward process,
with the same schedule as the denoiser), so its gradient means something along the whole
reverse path, and regresses the label (or its logit, ``config.target``) with a squared
loss. At the end, held-out Spearman between critic and true reward, and R^2 on the
critic's target scale, are measured at several noise levels and stored in the critic's
config (``config.metrics``).

A value critic (``kind="value"``, :class:`~fastdia.models.critic.ValueCritic`) trains on
data with base-model states (``make-data --states``): its label is the reward of each
whole sequence, and each step scores a block of ``config.max_length`` tokens cut at a
random offset, with the states of the tokens before it: the expected final reward given a
prefix and a noisy block. Its metrics are Spearman at fixed offsets (:data:`VALUE_OFFSETS`)
and noise levels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdia.base_model import BaseModel
from fastdia.data import TokenDataset
from fastdia.distributed import SINGLE, World
from fastdia.errors import ConfigError
from fastdia.models.checkpoint import critic_stem, save_model, write_json_atomic
from fastdia.models.critic import CriticConfig, TokenLocalCritic, build_critic, critic_target
from fastdia.train.common import (
    OptimConfig,
    Optimisation,
    autocast,
    batch_draws,
    history_path,
    identity_of,
    resumed_history,
    state_path,
    step_generator,
)
from fastdia.train.denoiser import noised
from fastdia.train.windows import WindowStates, crop_windows

log = logging.getLogger(__name__)

METRIC_LEVELS = (0.0, 0.25, 0.5, 0.75)
CLEAN_FRAC = 0.25  # windows trained clean (t = 0): a critic must also score final text
VALUE_OFFSETS = (8, 32, 64, 96)  # where a value critic's held-out blocks start


@dataclass
class CriticRun:
    """The trained critic (EMA weights), its held-out metrics and its history."""

    critic: nn.Module
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[n]`` tensors (average ranks for ties)."""
    return pearson(_rank(a), _rank(b))


def _rank(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    # average the ranks of ties
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two ``[n]`` tensors (0 if either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``."""
    pred, target = pred.double(), target.double()
    ss_tot = float((target - target.mean()).pow(2).sum())
    return 1 - float((target - pred).pow(2).sum()) / ss_tot if ss_tot > 0 else 0.0


@torch.no_grad()
def fold_affine(critic: nn.Module, scale: float, shift: float) -> None:
    """Make ``critic`` output ``scale * h + shift`` by rescaling its last layer in place."""
    if isinstance(critic, TokenLocalCritic):
        critic.w2.mul_(scale)
        critic.b2.mul_(scale).add_(shift)
    elif getattr(critic.config, "layers", 1) == 0:  # a token-local-form value critic
        critic.w2.mul_(scale)
        critic.head[-1].weight.mul_(scale)
        critic.head[-1].bias.mul_(scale).add_(shift)
    else:
        head = critic.head[-1]
        head.weight.mul_(scale)
        head.bias.mul_(scale).add_(shift)


def noisy_windows(
    base: BaseModel, ids: torch.Tensor, t: torch.Tensor, gen: torch.Generator, schedule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [B, L, d], t [B])``: the windows ``ids [B, L]`` embedded and noised to ``t``
    (noise drawn from ``gen``, then which rows stay clean), a :data:`CLEAN_FRAC` of them
    clean with their ``t`` set to 0; on the embeddings' device."""
    device = base.space.weight.device
    z0 = base.space.embed(ids.to(device))
    eps = torch.randn(z0.shape, generator=gen).to(device)
    clean = torch.rand(len(ids), generator=gen) < CLEAN_FRAC
    t = torch.where(clean, torch.zeros_like(t), t).to(device)
    return torch.where(clean.to(device)[:, None, None], z0, noised(z0, t, eps, schedule)), t


def reward_labels(
    base: BaseModel, data: TokenDataset, reward: Any, batch: int = 256
) -> torch.Tensor:
    """``[n]`` float32 true rewards of the decoded windows (``reward`` maps texts to ``[B]``)."""
    out = []
    for start in range(0, len(data), batch):
        texts = base.space.decode_batch(data.ids[start : start + batch])
        out.append(reward(texts).float())
    return torch.cat(out)


@torch.no_grad()
def critic_metrics(
    critic: nn.Module,
    base: BaseModel,
    ids: torch.Tensor,
    labels: torch.Tensor,
    schedule: str,
    *,
    seed: int = 4321,
) -> dict[str, float]:
    """Held-out Spearman and R^2 at each of :data:`METRIC_LEVELS`.

    ``labels [n]`` are true rewards; Spearman compares the critic with them, R^2 with
    their image on the critic's target scale (:func:`critic_target`).
    """
    target = critic_target(labels, critic.config.target)
    space = base.space
    device = space.weight.device
    gen = torch.Generator().manual_seed(seed)
    z0 = space.embed(ids.to(device))
    out: dict[str, float] = {}
    for level in METRIC_LEVELS:
        t = torch.full((ids.shape[0],), level, device=device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z = z0 if level == 0 else noised(z0, t, eps, schedule)
        pred = critic(z, t).float().cpu()
        out[f"spearman@{level}"] = spearman(pred, labels)
        out[f"r2@{level}"] = r_squared(pred, target)
    out["spearman"], out["r2"] = out["spearman@0.0"], out["r2@0.0"]
    return out


def critic_inputs(
    config: CriticConfig,
    data: TokenDataset,
    idx: torch.Tensor,
    gen: torch.Generator | None,
    device: torch.device,
    *,
    offset: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token windows ``[B, L]`` a critic scores for rows ``idx`` of ``data``, and the
    keyword inputs it reads besides ``z`` and ``t``: for a value critic, a block of
    ``config.max_length`` tokens at a random offset (drawn from ``gen``; or at ``offset``)
    and the states before it; for the others, the windows themselves and nothing."""
    ids = data.ids[idx]
    if not config.reads_states:
        return ids, {}
    block = config.max_length
    if offset is None:
        ids, start = crop_windows(gen, ids, block)
    else:
        start = torch.full((len(idx),), offset, dtype=torch.int64)
        ids = ids[:, offset : offset + block]
    states, mask = WindowStates(data.states[idx], start).before(0, config.prefix_states, device)
    return ids, {"states": states, "states_mask": mask}


@torch.no_grad()
def value_metrics(
    critic: nn.Module,
    base: BaseModel,
    data: TokenDataset,
    labels: torch.Tensor,
    schedule: str,
    *,
    seed: int = 4321,
) -> dict[str, float]:
    """A value critic's held-out Spearman with the whole samples' rewards, for blocks
    starting at each of :data:`VALUE_OFFSETS` (that fit) and at each noise level of
    :data:`METRIC_LEVELS`; ``"spearman"`` is their mean at level 0."""
    device = base.space.weight.device
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(len(data))
    out: dict[str, float] = {}
    at_zero = []
    for offset in (o for o in VALUE_OFFSETS if o + critic.config.max_length <= data.length):
        ids, inputs = critic_inputs(critic.config, data, idx, None, device, offset=offset)
        z0 = base.space.embed(ids.to(device))
        for level in METRIC_LEVELS:
            t = torch.full((len(idx),), level, device=device)
            eps = torch.randn(z0.shape, generator=gen).to(device)
            z = z0 if level == 0 else noised(z0, t, eps, schedule)
            rho = spearman(critic(z, t, **inputs).float().cpu(), labels)
            out[f"spearman@{offset}@{level}"] = rho
            if level == 0:
                at_zero.append(rho)
    out["spearman"] = sum(at_zero) / max(1, len(at_zero))
    return out


def train_critic(
    base: BaseModel,
    data: TokenDataset,
    labels: torch.Tensor,
    holdout: TokenDataset,
    holdout_labels: torch.Tensor,
    out_dir: str | Path,
    config: CriticConfig,
    optim: OptimConfig,
    *,
    schedule: str = "sqrt",
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    world: World = SINGLE,
) -> CriticRun:
    """Train ``config.reward``'s critic; writes ``critic-<reward>.*`` and resume state.

    Under ``torchrun`` (``world``) each rank fits its share of every global batch and
    ``DistributedDataParallel`` averages the gradients (as :func:`fastdia.train.denoiser.
    train_denoiser`); rank 0 measures and writes.
    """
    from tqdm import tqdm

    device = torch.device(device)
    out_dir = Path(out_dir)
    if not config.reward:
        raise ConfigError("the critic config must name the reward it imitates")
    if labels.shape != (len(data),) or holdout_labels.shape != (len(holdout),):
        raise ConfigError("need one label per window")
    base.space.check_fingerprint(data.fingerprint, f"dataset {data.source}")
    if config.reads_states and (data.states is None or holdout.states is None):
        raise ConfigError(
            f"a value critic reads base-model states, and {data.source} was loaded without "
            "them: make the data with `fastdia make-data --states`"
        )
    identity = identity_of(
        config, optim, data=data.source, windows=len(data), kind="critic", schedule=schedule
    )
    torch.manual_seed(optim.seed)
    critic = build_critic(config).to(device)
    stem = critic_stem(config.reward, config.kind)
    run = Optimisation(critic, optim, state_path(out_dir, stem), identity, world)
    forward = run.parallel(critic)
    rows = world.rows(optim.batch_size)  # this rank's share of every global batch
    history: list[dict[str, Any]] = []
    if resume:
        history = resumed_history(out_dir, stem, run.resume())
    started = time.perf_counter()
    # regress standardised labels (a reward with a narrow range, e.g. nontoxic with std
    # 0.05, would otherwise give tiny gradients); the scale is folded back in at the end
    labels = critic_target(labels, config.target)
    shift, scale = labels.mean().item(), labels.std().item() or 1.0
    labels = ((labels - shift) / scale).to(device)
    bar = tqdm(
        total=optim.steps,
        initial=run.step,
        desc=f"critic {config.reward}",
        disable=not (progress and world.is_main),
    )
    while run.step < optim.steps:
        critic.train()
        gen = step_generator(optim.seed, run.step)
        idx, t = batch_draws(gen, len(data), optim.batch_size)
        ids, inputs = critic_inputs(config, data, idx, gen, device)
        z, t = noisy_windows(base, ids, t, gen, schedule)
        mine = {k: v if not torch.is_tensor(v) else v[rows.to(v.device)] for k, v in inputs.items()}
        target = labels[idx.to(device)][rows.to(device)]
        with autocast(device):
            err = (forward(z[rows.to(device)], t[rows.to(device)], **mine).float() - target).pow(2)
            # the global batch's mean: this rank's sum over the global batch, times the
            # ranks (their gradients are averaged)
            loss = err.sum() * world.size / optim.batch_size
        shown = (world.sum(err.sum().detach()) / optim.batch_size).item()
        run.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{shown:.4f}")
        history.append({"step": run.step, "loss": shown})
        if run.step % optim.save_every == 0 and run.step < optim.steps and world.is_main:
            write_json_atomic(history_path(out_dir, stem), history)
            run.save()
    bar.close()
    final = build_critic(config).to(device)
    final.load_state_dict(run.final_state_dict())
    fold_affine(final, scale, shift)
    final.eval()
    if not world.is_main:  # rank 0 measures and writes
        world.barrier()
        return CriticRun(final, {}, history, time.perf_counter() - started)
    if config.reads_states:
        metrics = value_metrics(final, base, holdout, holdout_labels, schedule)
    else:
        metrics = critic_metrics(final, base, holdout.ids, holdout_labels, schedule)
    final.config.metrics = {
        **metrics,
        "holdout_windows": len(holdout),
        "train_windows": len(data),
        "steps": optim.steps,
    }
    save_model(final, out_dir, stem, space=base.space, base_model=base.name)
    write_json_atomic(history_path(out_dir, stem), history)
    run.save()
    world.barrier()
    log.info("critic %s: %s", config.reward, {k: round(v, 3) for k, v in metrics.items()})
    return CriticRun(final, metrics, history, time.perf_counter() - started)
