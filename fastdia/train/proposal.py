"""Training the amortised proposal (:mod:`fastdia.models.proposal`) to imitate critics'
gradients.

Each step draws windows of the data, noises them to random levels ``t`` with the
denoiser's schedule (a quarter of them clean, as the critics are trained:
:func:`fastdia.train.critic.noisy_windows`), and regresses
each head ``g_j(z_i, t)`` on reward ``j``'s token-local critic's per-token gradient
``L grad_{z_i} h_j(z, t)`` (closed form). The loss is each reward's squared error divided by
the mean square of its target (measured once on held-out windows), so rewards of
different scales weigh alike. Held-out metrics, per reward and noise level: the relative
squared error ``|g - target|^2 / |target|^2`` and the mean cosine between predicted and
true per-token gradients. Resume is exact (:mod:`fastdia.train.common`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdia.base_model import BaseModel
from fastdia.data import TokenDataset
from fastdia.errors import ConfigError
from fastdia.models.checkpoint import PROPOSAL_STEM, save_model, write_json_atomic
from fastdia.models.critic import TokenLocalCritic
from fastdia.models.proposal import AmortisedProposal, ProposalConfig
from fastdia.train.common import (
    OptimConfig,
    Optimisation,
    batch_draws,
    history_path,
    identity_of,
    resumed_history,
    state_path,
    step_generator,
)
from fastdia.train.critic import METRIC_LEVELS, noisy_windows
from fastdia.train.denoiser import noised

log = logging.getLogger(__name__)


@dataclass
class ProposalRun:
    """The trained proposal (EMA weights), its held-out metrics and its history."""

    proposal: AmortisedProposal
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def check_imitable(critics: Mapping[str, nn.Module], rewards: list[str]) -> list[nn.Module]:
    """The token-local critics of ``rewards`` in order; a ConfigError names a reward with no
    critic, or with one whose gradient is not token-local."""
    missing = [r for r in rewards if r not in critics]
    if missing:
        have = ", ".join(sorted(critics)) or "none"
        raise ConfigError(
            f"no critic for {', '.join(missing)} (the checkpoint's critics: {have}); train one "
            f"first with `fastdia train-critic --reward {missing[0]}`"
        )
    wrong = [r for r in rewards if not isinstance(critics[r], TokenLocalCritic)]
    if wrong:
        raise ConfigError(
            f"the proposal imitates token-local critics, and the critic of {', '.join(wrong)} "
            "is a context critic (its gradient at a token reads the others)"
        )
    return [critics[r] for r in rewards]


def gradient_targets(critics: list[nn.Module], z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[B, L, R, d]`` float32: each critic's per-token gradient ``L grad_{z_i} h_j(z, t)``
    at ``z [B, L, d]``, times ``t [B]``."""
    length = z.shape[1]
    return torch.stack([c.value_and_grad(z, t)[1] * length for c in critics], dim=2)


@torch.no_grad()
def proposal_metrics(
    proposal: AmortisedProposal,
    critics: list[nn.Module],
    base: BaseModel,
    ids: torch.Tensor,
    schedule: str,
    *,
    seed: int = 4321,
) -> dict[str, float]:
    """Per reward and level of :data:`METRIC_LEVELS`: ``rel_err`` (``|g - target|^2 /
    |target|^2`` over the windows ``ids [n, L]``) and ``cos`` (the mean per-token cosine);
    ``"rel_err"`` and ``"cos"`` are their means over rewards and levels."""
    device = base.space.weight.device
    gen = torch.Generator().manual_seed(seed)
    z0 = base.space.embed(ids.to(device))
    out: dict[str, float] = {}
    for level in METRIC_LEVELS:
        t = torch.full((ids.shape[0],), level, device=device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z = z0 if level == 0 else noised(z0, t, eps, schedule)
        pred, target = proposal.heads(z, t), gradient_targets(critics, z, t)
        for j, name in enumerate(proposal.config.rewards):
            p, q = pred[:, :, j], target[:, :, j]
            out[f"rel_err@{name}@{level}"] = float((p - q).pow(2).sum() / q.pow(2).sum())
            out[f"cos@{name}@{level}"] = float(nn.functional.cosine_similarity(p, q, dim=-1).mean())
    for key in ("rel_err", "cos"):
        values = [v for k, v in out.items() if k.startswith(key + "@")]
        out[key] = sum(values) / len(values)
    return out


def _target_scale(
    critics: list[nn.Module], base: BaseModel, ids: torch.Tensor, schedule: str
) -> torch.Tensor:
    """``[R]``: each reward's mean squared per-token gradient over held-out windows at
    uniform times (fixed draws: the same in every run and resume)."""
    gen = torch.Generator().manual_seed(1234)
    t = torch.rand(len(ids), generator=gen)
    z, t = noisy_windows(base, ids, t, gen, schedule)
    with torch.no_grad():
        return gradient_targets(critics, z, t).pow(2).mean(dim=(0, 1, 3)).clamp_min(1e-12)


def train_proposal(
    base: BaseModel,
    data: TokenDataset,
    holdout: TokenDataset,
    critics: Mapping[str, nn.Module],
    out_dir: str | Path,
    config: ProposalConfig,
    optim: OptimConfig,
    *,
    schedule: str = "sqrt",
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ProposalRun:
    """Train a proposal for ``config.rewards`` against their critics in ``critics`` (by
    reward spec); writes ``proposal.*`` into ``out_dir`` with its resume state.

    Raises:
        ConfigError: a reward without a token-local critic, data of another base model.
    """
    from tqdm import tqdm

    device = torch.device(device)
    out_dir = Path(out_dir)
    targets = [c.to(device) for c in check_imitable(critics, config.rewards)]
    base.space.check_fingerprint(data.fingerprint, f"dataset {data.source}")
    identity = identity_of(
        config, optim, data=data.source, windows=len(data), kind="proposal", schedule=schedule
    )
    torch.manual_seed(optim.seed)
    proposal = AmortisedProposal(config).to(device)
    run = Optimisation(proposal, optim, state_path(out_dir, PROPOSAL_STEM), identity)
    history: list[dict[str, Any]] = []
    if resume:
        history = resumed_history(out_dir, PROPOSAL_STEM, run.resume())
    started = time.perf_counter()
    scale = _target_scale(targets, base, holdout.ids, schedule).to(device)  # [R]
    bar = tqdm(total=optim.steps, initial=run.step, desc="proposal", disable=not progress)
    while run.step < optim.steps:
        proposal.train()
        gen = step_generator(optim.seed, run.step)
        idx, t = batch_draws(gen, len(data), optim.batch_size)
        z, t = noisy_windows(base, data.ids[idx], t, gen, schedule)
        with torch.no_grad():
            target = gradient_targets(targets, z, t)
        err = (proposal.heads(z, t) - target).pow(2).mean(dim=(0, 1, 3))  # [R]
        loss = (err / scale).mean()
        shown = loss.item()
        run.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{shown:.4f}")
        history.append({"step": run.step, "loss": shown})
        if run.step % optim.save_every == 0 and run.step < optim.steps:
            write_json_atomic(history_path(out_dir, PROPOSAL_STEM), history)
            run.save()
    bar.close()
    final = AmortisedProposal(config).to(device)
    final.load_state_dict(run.final_state_dict())
    final.eval()
    metrics = proposal_metrics(final, targets, base, holdout.ids, schedule)
    final.config.metrics = {
        **metrics,
        "holdout_windows": len(holdout),
        "train_windows": len(data),
        "steps": optim.steps,
    }
    save_model(final, out_dir, PROPOSAL_STEM, space=base.space, base_model=base.name)
    write_json_atomic(history_path(out_dir, PROPOSAL_STEM), history)
    run.save()
    log.info(
        "proposal %s: relative error %.3f, cosine %.3f (held out, mean over rewards and levels)",
        ",".join(config.rewards),
        metrics["rel_err"],
        metrics["cos"],
    )
    return ProposalRun(final, metrics, history, time.perf_counter() - started)
