"""Training the denoiser with the DDPM loss on ``z_0 = c E[x]`` (DESIGN §1).

Each step draws windows ``x``, times ``t ~ U(0, 1]`` and noise ``eps``, forms
``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` and minimises
``|eps_hat - eps|^2`` (epsilon prediction), ``|x0_hat - z_0|^2`` (x0 prediction) or the
cross-entropy of the true tokens under the predicted distribution (``"tokens"``, whose
token subset is every token of the training data).
Validation reports, on held-out windows, the loss and the rounding accuracy of the x0
estimate (the fraction of tokens whose nearest embedding is the right one) at several
noise levels, with the EMA weights that are saved for sampling.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fastdia.base_model import BaseModel
from fastdia.data import TokenDataset
from fastdia.errors import ConfigError
from fastdia.models.checkpoint import DENOISER_STEM, save_model, write_json_atomic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.ops import round_to_vocab
from fastdia.schedules import alpha_bar
from fastdia.train.common import (
    OptimConfig,
    Optimisation,
    autocast,
    batch_draws,
    history_path,
    identity_of,
    state_path,
    step_generator,
)

log = logging.getLogger(__name__)

VAL_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
VAL_WINDOWS = 48  # held-out windows per validation (rounding against V is the cost)


@dataclass
class DenoiserRun:
    """The result of :func:`train_denoiser`: the model (EMA weights) and its history."""

    denoiser: Denoiser
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def noised(z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: str) -> torch.Tensor:
    """``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` for ``z0, eps [B, L, d]``, ``t [B]``."""
    abar = alpha_bar(schedule, t).to(z0.dtype)[:, None, None]
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def denoiser_loss(
    den: Denoiser, ids: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The loss of one batch: ``ids [B, L]``, ``z0 = c E[ids]``, ``t [B]``, ``eps`` like z0.

    Mean squared error per element for ``"eps"``/``"x0"``; mean cross-entropy per token
    (tokens outside the head's subset ignored) for ``"tokens"``.
    """
    out = den.features(noised(z0, t, eps, den.config.schedule), t).float()
    if den.config.prediction == "tokens":
        target = den.token_index(ids.to(out.device))
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())
    target = eps if den.config.prediction == "eps" else z0
    return (out - target).pow(2).mean()


def token_vocabulary(data: TokenDataset) -> torch.Tensor:
    """The sorted distinct token ids of ``data`` (the subset of a ``"tokens"`` head)."""
    return torch.unique(data.ids)


def x0_estimate(den: Denoiser, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's estimate of ``z_0`` (converting an epsilon prediction)."""
    out = den(z_t, t).float()
    if den.config.predicts_x0:
        return out
    abar = alpha_bar(den.config.schedule, t).to(z_t.dtype)[:, None, None]
    return (z_t - (1 - abar).sqrt() * out) / abar.sqrt()


@torch.no_grad()
def validate(
    den: Denoiser, base: BaseModel, ids: torch.Tensor, *, seed: int = 1234
) -> dict[str, float]:
    """Held-out loss and rounding accuracy of the x0 estimate at :data:`VAL_LEVELS`."""
    space = base.space
    device = space.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = ids.to(device)
    z0 = space.embed(ids)
    bias = space.rounding_bias("l2")
    out: dict[str, float] = {}
    losses = []
    for level in VAL_LEVELS:
        t = torch.full((ids.shape[0],), level, device=device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = noised(z0, t, eps, den.config.schedule)
        x0 = x0_estimate(den, z_t, t)
        acc = (round_to_vocab(x0, space.weight, bias) == ids).float().mean().item()
        out[f"acc@{level}"] = acc
        losses.append(denoiser_loss(den, ids, z0, t, eps).item())
    out["val_loss"] = sum(losses) / len(losses)
    return out


def train_denoiser(
    base: BaseModel,
    data: TokenDataset,
    out_dir: str | Path,
    config: DenoiserConfig,
    optim: OptimConfig,
    *,
    holdout: TokenDataset | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> DenoiserRun:
    """Train a denoiser on ``data``; checkpoints and resume state go to ``out_dir``.

    ``out_dir`` receives ``denoiser.{safetensors,json}`` (EMA weights) every
    ``optim.save_every`` steps and at the end, and ``training/denoiser_state.pt`` (resume
    state) and ``training/denoiser_history.json`` (loss and validation metrics).
    A ``"tokens"`` config with ``vocab_size == 0`` gets the size of the data's token set.
    """
    from tqdm import tqdm

    device = torch.device(device)
    out_dir = Path(out_dir)
    if config.dim != base.space.dim:
        raise ConfigError(f"denoiser dim {config.dim} != embedding dim {base.space.dim}")
    if data.length > config.max_length:
        raise ConfigError(f"windows of {data.length} tokens exceed max_length {config.max_length}")
    base.space.check_fingerprint(data.fingerprint, f"dataset {data.source}")
    vocab_ids = None
    if config.prediction == "tokens":
        vocab_ids = token_vocabulary(data)
        if config.vocab_size not in (0, len(vocab_ids)):
            raise ConfigError(
                f"vocab_size {config.vocab_size} != the {len(vocab_ids)} distinct tokens of "
                f"{data.source}; leave it 0 to take it from the data"
            )
        config = replace(config, vocab_size=len(vocab_ids))
    identity = identity_of(config, optim, data=data.source, windows=len(data), kind="denoiser")
    torch.manual_seed(optim.seed)
    den = Denoiser(config, vocab_ids).bind_embeddings(base.space).to(device)
    run = Optimisation(den, optim, state_path(out_dir, DENOISER_STEM), identity)
    history: list[dict[str, Any]] = []
    if resume:
        start_step = run.resume()
        history = [h for h in _read_history(out_dir) if h["step"] <= start_step]
    ids_all, space = data.ids, base.space
    started = time.perf_counter()
    bar = tqdm(total=optim.steps, initial=run.step, desc="denoiser", disable=not progress)
    while run.step < optim.steps:
        den.train()
        gen = step_generator(optim.seed, run.step)
        idx, t = batch_draws(gen, len(ids_all), optim.batch_size)
        z0 = space.embed(ids_all[idx].to(device))
        eps = torch.randn(z0.shape, generator=gen).to(device)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # dropout
        with autocast(device):
            loss = denoiser_loss(den, ids_all[idx], z0, t.to(device), eps)
        lr = run.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        record: dict[str, Any] = {"step": run.step, "loss": loss.item(), "lr": lr}
        last = run.step == optim.steps
        if holdout is not None and (run.step % optim.val_every == 0 or last):
            with run.averaged():
                den.eval()
                record.update(validate(den, base, holdout.ids[:VAL_WINDOWS]))
            log.info("step %d %s", run.step, {k: round(v, 4) for k, v in record.items()})
        history.append(record)
        if run.step % optim.save_every == 0 or last:
            with run.averaged():
                save_model(den, out_dir, DENOISER_STEM, space=space, base_model=base.name)
            write_json_atomic(history_path(out_dir, DENOISER_STEM), history)
            run.save()
    bar.close()
    final = Denoiser(config)
    final.load_state_dict(run.final_state_dict())
    final.bind_embeddings(base.space).to(device)
    return DenoiserRun(final.eval(), history, time.perf_counter() - started)


def _read_history(out_dir: Path) -> list[dict[str, Any]]:
    path = history_path(out_dir, DENOISER_STEM)
    return json.loads(path.read_text()) if path.is_file() else []
