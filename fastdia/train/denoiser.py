"""Training the denoiser with the DDPM loss on ``z_0 = c E[x]`` (docs/design.md §1).

Each step draws windows ``x``, times ``t ~ U(0, 1]`` and noise ``eps``, forms
``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` and minimises
``|eps_hat - eps|^2`` (epsilon prediction), ``|x0_hat - z_0|^2`` (x0 prediction) or the
cross-entropy of the true tokens under the predicted distribution (``"tokens"``, whose
token subset is every token of the training data).
Validation reports, on held-out windows, the loss and the rounding accuracy of the x0
estimate (the fraction of tokens whose nearest embedding is the right one) at several
noise levels, with the EMA weights that are saved for sampling.

A ``clean_prompt`` denoiser is trained with a clean prefix of random length per window
(none on a quarter of the windows, else 1 to ``L / 2`` tokens): those positions hold
``z_0`` itself, are flagged by the mask and are left out of the loss. A
``self_condition`` denoiser gets, on half of the batches, its own stop-gradient x0
estimate of the same ``z_t`` as a second input (zeros otherwise). Both draws, like
everything else in a step, are pure functions of ``(seed, step)``. With ``noise_mask``,
some windows also get half of their positions at pure noise (one noise level per
position), to be predicted from their context (:func:`noise_mask_times`).

After training, :func:`measure_time_warp` measures the held-out cross-entropy over
noise levels and stores the step allocation (CDCD time warping) in the config.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fastdia.base_model import BaseModel
from fastdia.data import TokenDataset
from fastdia.distributed import SINGLE, World
from fastdia.errors import ConfigError
from fastdia.models.checkpoint import DENOISER_STEM, save_model, write_json_atomic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.ops import round_to_vocab
from fastdia.schedules import alpha_bar, check_choice
from fastdia.train.common import (
    T_MIN,
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
from fastdia.train.time_warp import TRAIN_TIMES, OnlineTimeWarp, time_warp
from fastdia.train.windows import WindowStates, crop_windows

log = logging.getLogger(__name__)

VAL_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
VAL_WINDOWS = 48  # held-out windows per validation (rounding against V is the cost)


@dataclass
class DenoiserRun:
    """The result of :func:`train_denoiser`: the model (EMA weights) and its history."""

    denoiser: Denoiser
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def level_of(schedule: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``abar_t`` in ``like``'s dtype, shaped to broadcast against ``like [B, L, d]``:
    ``[B, 1, 1]`` for window times ``t [B]``, ``[B, L, 1]`` for per-position ``[B, L]``."""
    abar = alpha_bar(schedule, t).to(like.dtype)
    return abar.view(*abar.shape, *(1,) * (like.dim() - abar.dim()))


def noised(z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: str) -> torch.Tensor:
    """``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` for ``z0, eps [B, L, d]`` and times
    ``t [B]`` (one per window) or ``[B, L]`` (one per position)."""
    abar = level_of(schedule, t, z0)
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


PROMPT_FREE_FRAC = 0.25  # windows trained without a clean prefix (clean_prompt models)
SELF_COND_FRAC = 0.5  # batches trained with the model's own x0 estimate as input


@dataclass
class Conditioning:
    """The conditioning inputs of one batch.

    Attributes:
        clean_mask: ``[B, L]`` bool, True at clean (prompt) positions, or None.
        self_cond: whether to feed the model's own x0 estimate this batch.
        states: ``[B, M, d]`` float32 base-model states before the first noisy position
            (a denoiser with ``prefix_states``), or None.
        states_mask: ``[B, M]`` bool, True where a state exists, or None.
    """

    clean_mask: torch.Tensor | None = None
    self_cond: bool = False
    states: torch.Tensor | None = None
    states_mask: torch.Tensor | None = None

    @property
    def state_inputs(self) -> dict[str, torch.Tensor | None]:
        """The denoiser's state keyword arguments."""
        return {"states": self.states, "states_mask": self.states_mask}

    def rows(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of the batch rows ``index`` (``[n]`` int64)."""

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index.to(x.device)]

        return Conditioning(
            pick(self.clean_mask), self.self_cond, pick(self.states), pick(self.states_mask)
        )


class WindowLoss(torch.nn.Module):
    """:func:`window_losses` of a denoiser as a module's forward: what
    ``DistributedDataParallel`` wraps to average the gradients of a distributed run."""

    def __init__(self, den: Denoiser) -> None:
        super().__init__()
        self.den = den

    def forward(
        self,
        ids: torch.Tensor,
        z0: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        cond: Conditioning,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return window_losses(self.den, ids, z0, t, eps, cond)


def draw_conditioning(
    gen: torch.Generator, config: DenoiserConfig, batch: int, length: int
) -> Conditioning:
    """This step's clean prefixes and self-conditioning coin (from the step generator)."""
    mask = None
    if config.clean_prompt:
        plen = torch.randint(1, max(2, length // 2 + 1), (batch,), generator=gen)
        plen[torch.rand(batch, generator=gen) < PROMPT_FREE_FRAC] = 0
        mask = torch.arange(length)[None, :] < plen[:, None]
    sc = bool(config.self_condition and torch.rand((), generator=gen) < SELF_COND_FRAC)
    return Conditioning(mask, sc)


MASK_PROB = 0.5  # positions of a noise-masked window set to pure noise


def noise_mask_times(
    gen: torch.Generator, t: torch.Tensor, length: int, frac: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position times ``[B, L]`` for a batch whose window times are ``t [B]``.

    A fraction ``frac`` of the windows (drawn per window) are *noise-masked*: each of
    their positions is pure noise (``t = 1``) with probability :data:`MASK_PROB`, and
    keeps the window's time otherwise; the other windows keep their time everywhere.
    A masked position can only be predicted from its context, as in a masked language
    model, which one shared level almost never asks for: with ``d = 576`` a token stays
    identifiable from its own noisy embedding up to ``abar ~ 1 / d`` (``t ~ 0.996`` for
    the sqrt schedule), so a shared-level model learns next to nothing from context.
    Per-position levels follow Diffusion Forcing (Chen et al. 2024).
    Returns ``(times [B, L], masked_windows [B] bool)``.
    """
    batch = t.shape[0]
    pure = torch.rand(batch, length, generator=gen) < MASK_PROB
    windows = torch.rand(batch, generator=gen) < frac
    shared = t[:, None].expand(batch, length)
    return torch.where(windows[:, None] & pure, torch.ones_like(shared), shared), windows


def model_input(
    den: Denoiser,
    z0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Conditioning,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z_t`` with clean prompt positions, and the self-conditioning input (or None)."""
    z_t = noised(z0, t, eps, den.config.schedule)
    mask = cond.clean_mask
    if mask is not None:
        mask = mask.to(z0.device)
        z_t = torch.where(mask[..., None], z0, z_t)
    x0_prev = None
    if cond.self_cond:
        with torch.no_grad():
            x0_prev = x0_estimate(den, z_t, t, clean_mask=mask, **cond.state_inputs).detach()
    return z_t, x0_prev


def window_losses(
    den: Denoiser,
    ids: torch.Tensor,
    z0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Conditioning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's summed loss ``[B]`` and how many positions it counts ``[B]`` (float32).

    ``ids [B, L]``, ``z0 = c E[ids]``, ``t [B]`` (or ``[B, L]``, one level per position),
    ``eps`` like z0. A position's loss is the squared error averaged over the embedding
    for ``"eps"``/``"x0"`` and the cross-entropy of its token for ``"tokens"``; clean
    (prompt) positions of ``cond`` and tokens outside a tokens head's subset are not
    counted.
    """
    cond = cond or Conditioning()
    z_t, x0_prev = model_input(den, z0, t, eps, cond)
    mask = None if cond.clean_mask is None else cond.clean_mask.to(z0.device)
    out = den.features(z_t, t, x0_prev=x0_prev, clean_mask=mask, **cond.state_inputs).float()
    if den.config.prediction == "tokens":
        target = den.token_index(ids.to(out.device))
        if mask is not None:
            target = target.masked_fill(mask, -100)
        ce = torch.nn.functional.cross_entropy(
            out.flatten(0, 1), target.flatten(), reduction="none"
        ).view(target.shape)
        return ce.sum(dim=1), (target != -100).sum(dim=1).float()
    target = eps if den.config.prediction == "eps" else z0
    err = (out - target).pow(2).mean(dim=-1)
    keep = torch.ones_like(err) if mask is None else (~mask).to(err.dtype)
    return (err * keep).sum(dim=1), keep.sum(dim=1)


def denoiser_loss(
    den: Denoiser,
    ids: torch.Tensor,
    z0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """The loss of one batch (arguments as :func:`window_losses`): the mean over the
    counted positions of all windows (mean squared error per element for
    ``"eps"``/``"x0"``, mean cross-entropy per token for ``"tokens"``)."""
    total, count = window_losses(den, ids, z0, t, eps, cond)
    return total.sum() / count.sum().clamp_min(1)


def token_vocabulary(data: TokenDataset) -> torch.Tensor:
    """The sorted distinct token ids of ``data`` (the subset of a ``"tokens"`` head)."""
    return torch.unique(data.ids)


def x0_estimate(
    den: Denoiser,
    z_t: torch.Tensor,
    t: torch.Tensor,
    *,
    x0_prev: torch.Tensor | None = None,
    clean_mask: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
    states_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoiser's estimate of ``z_0`` ``[B, L, d]`` (converting an epsilon prediction)."""
    out = den(
        z_t, t, x0_prev=x0_prev, clean_mask=clean_mask, states=states, states_mask=states_mask
    ).float()
    if den.config.predicts_x0:
        return out
    abar = level_of(den.config.schedule, t, z_t)
    return (z_t - (1 - abar).sqrt() * out) / abar.sqrt()


def refined_x0(
    den: Denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None
) -> torch.Tensor:
    """The x0 estimate as the sampler sees it: a self-conditioning model's second pass
    (``cond``: only its states are read)."""
    inputs = cond.state_inputs if cond is not None else {}
    x0 = x0_estimate(den, z_t, t, **inputs)
    if den.config.self_condition:
        x0 = x0_estimate(den, z_t, t, x0_prev=x0, **inputs)
    return x0


def states_conditioning(
    den: Denoiser,
    states: WindowStates | None,
    prefix: torch.Tensor | int,
    device: torch.device,
    self_cond: bool = False,
) -> Conditioning:
    """A batch's conditioning without clean prefix positions: the states before position
    ``prefix`` of each window when ``den`` reads them (``states`` is then required)."""
    if not den.config.reads_states:
        return Conditioning(None, self_cond)
    if states is None:
        raise ConfigError(
            "this denoiser reads base-model states: validate it on windows with states "
            "(data made with `fastdia make-data --states`)"
        )
    return Conditioning(None, self_cond, *states.before(prefix, den.config.prefix_states, device))


@torch.no_grad()
def validate(
    den: Denoiser,
    base: BaseModel,
    ids: torch.Tensor,
    *,
    seed: int = 1234,
    states: WindowStates | None = None,
) -> dict[str, float]:
    """Held-out loss and rounding accuracy of the x0 estimate at :data:`VAL_LEVELS`
    (``states``: the windows' base-model states, for a denoiser that reads them)."""
    space = base.space
    device = space.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = ids.to(device)
    z0 = space.embed(ids)
    bias = space.rounding_bias("l2")
    cond = states_conditioning(den, states, 0, device)
    out: dict[str, float] = {}
    losses = []
    for level in VAL_LEVELS:
        t = torch.full((ids.shape[0],), level, device=device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        z_t = noised(z0, t, eps, den.config.schedule)
        x0 = refined_x0(den, z_t, t, cond)
        acc = (round_to_vocab(x0, space.weight, bias) == ids).float().mean().item()
        out[f"acc@{level}"] = acc
        losses.append(denoiser_loss(den, ids, z0, t, eps, cond).item())
    out["val_loss"] = sum(losses) / len(losses)
    if den.config.clean_prompt and den.config.prediction == "tokens":
        out["next_token_ce"] = next_token_ce(den, base, ids, gen=gen, states=states)
    return out


NEXT_TOKEN_PREFIXES = (4, 8, 12, 16)  # clean prefix lengths of :func:`next_token_ce`


@torch.no_grad()
def next_token_ce(
    den: Denoiser,
    base: BaseModel,
    ids: torch.Tensor,
    *,
    prefixes: tuple[int, ...] = NEXT_TOKEN_PREFIXES,
    gen: torch.Generator | None = None,
    states: WindowStates | None = None,
) -> float:
    """How much of a language model the prior is: the mean cross-entropy (nats) of the
    token right after a clean prefix, with every later position pure noise (``t = 1``, no
    self-conditioning), i.e. the first decision a prompted sample makes.

    ``ids [B, L]`` held-out windows; one pass per prefix length in ``prefixes`` (those
    shorter than ``L``); tokens outside the head's subset are not counted. A unigram model
    of the data scores its token entropy here (about 6.6 nats for the demo's data), the
    base model its next-token loss (about 2.3). Needs a ``clean_prompt`` tokens head;
    a denoiser that reads base-model states gets those before the first noisy position.
    """
    if not (den.config.clean_prompt and den.config.prediction == "tokens"):
        raise ConfigError("next_token_ce needs a clean_prompt denoiser with a tokens head")
    device = base.space.weight.device
    ids = ids.to(device)
    batch, length = ids.shape
    z0 = base.space.embed(ids)
    total, count = 0.0, 0
    for p in (p for p in prefixes if 0 < p < length):
        mask = (torch.arange(length, device=device) < p).expand(batch, -1)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        z = torch.where(mask[..., None], z0, noise)
        cond = states_conditioning(den, states, p, device)
        logits = den.features(
            z, torch.ones(batch, device=device), clean_mask=mask, **cond.state_inputs
        )[:, p]
        target = den.token_index(ids[:, p].contiguous())
        ce = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        total += ce.item()
        count += int((target != -100).sum())
    return total / max(count, 1)


WARP_LEVELS = 41  # noise levels at which the time warp measures the loss
WARP_WINDOWS = 64  # held-out windows per level


@torch.no_grad()
def loss_curve(
    den: Denoiser,
    base: BaseModel,
    ids: torch.Tensor,
    *,
    levels: int = WARP_LEVELS,
    seed: int = 0,
    states: WindowStates | None = None,
) -> tuple[list[float], list[float]]:
    """The held-out loss ``L(t)`` at ``levels`` evenly spaced times in ``[0, 1]``.

    Returns ``(times, losses)``; no clean prefix, the self-conditioned second pass when
    the model has one (as the sampler runs it).
    """
    device = base.space.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = ids.to(device)
    z0 = base.space.embed(ids)
    times = torch.linspace(0, 1, levels).clamp_min(1e-3).tolist()
    losses = []
    for level in times:
        t = torch.full((ids.shape[0],), level, device=device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        cond = states_conditioning(den, states, 0, device, den.config.self_condition)
        losses.append(denoiser_loss(den, ids, z0, t, eps, cond).item())
    times[0] = 0.0
    return times, losses


def measure_time_warp(
    den: Denoiser,
    base: BaseModel,
    ids: torch.Tensor,
    *,
    seed: int = 0,
    states: WindowStates | None = None,
) -> dict[str, list[float]]:
    """Measure ``L(t)`` on held-out ``ids`` and return ``{"times", "losses", "grid"}``."""
    was_training = den.training
    den.eval()
    states = None if states is None else states.take(WARP_WINDOWS)
    times, losses = loss_curve(den, base, ids[:WARP_WINDOWS], seed=seed, states=states)
    den.train(was_training)
    return {"times": times, "losses": losses, "grid": time_warp(times, losses)}


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
    warp: bool = False,
    train_times: str = "uniform",
    init: Denoiser | None = None,
    noise_mask: float = 0.0,
    world: World = SINGLE,
) -> DenoiserRun:
    """Train a denoiser on ``data``; checkpoints and resume state go to ``out_dir``.

    ``out_dir`` receives ``denoiser.{safetensors,json}`` (EMA weights) every
    ``optim.save_every`` steps and at the end, and ``training/denoiser_state.pt`` (resume
    state) and ``training/denoiser_history.json`` (loss and validation metrics).
    A ``"tokens"`` config with ``vocab_size == 0`` gets the size of the data's token set.
    With ``warp`` (and a ``holdout``) the final model's step allocation is measured
    (:func:`measure_time_warp`), stored as ``config.time_grid`` and saved, and the curve
    goes into the history as ``{"time_warp": ...}``.

    ``train_times``: ``"uniform"`` draws training times ``t ~ U(0, 1]``; ``"warp"`` draws
    them uniformly in the running loss curve (:class:`OnlineTimeWarp`, starting from
    ``init``'s measured ``time_grid`` when it has one), so training concentrates where
    the loss changes, the levels where sampling decides tokens.
    ``init``: a trained denoiser to start from (fine-tuning): its weights and, for a
    tokens head, its token subset (data tokens outside it are not counted); its
    architecture must be ``config``'s. The optimiser starts afresh.
    ``noise_mask``: the fraction of windows trained with half of their positions at pure
    noise (:func:`noise_mask_times`); 0 keeps one time per window. A ``"warp"`` run's loss
    curve reads the other windows only.

    A ``config`` with ``prefix_states`` trains on ``data`` with states (``make-data
    --states``, loaded with ``load_dataset(..., states=True)``): each window of
    ``max_length`` tokens is cut at a random offset of its sequence and reads the states
    before its first noisy position (:mod:`fastdia.train.windows`); validation cuts the
    last ``max_length`` tokens of each held-out sequence. ``init`` may then be a denoiser
    without state input: its weights are loaded and the state input starts at zero.

    Under ``torchrun`` (``world``, :mod:`fastdia.distributed`) every rank draws the same
    global batch of ``optim.batch_size`` windows and computes the loss of its share (rows
    ``rank, rank + W, ...``); ``DistributedDataParallel`` averages the gradients, so the
    ranks keep identical weights and a step equals one process's step on the whole batch
    up to the order of float sums. Rank 0 validates and writes; a run resumes with any
    world size (the state does not depend on it).
    """
    from tqdm import tqdm

    device = torch.device(device)
    out_dir = Path(out_dir)
    if config.dim != base.space.dim:
        raise ConfigError(f"denoiser dim {config.dim} != embedding dim {base.space.dim}")
    window = config.max_length if config.reads_states else data.length
    if config.reads_states:
        _check_state_data(data, config)
        if holdout is not None:
            _check_state_data(holdout, config)
    elif data.length > config.max_length:
        raise ConfigError(f"windows of {data.length} tokens exceed max_length {config.max_length}")
    base.space.check_fingerprint(data.fingerprint, f"dataset {data.source}")
    check_choice(train_times, TRAIN_TIMES, "train_times")
    if not 0.0 <= noise_mask <= 1.0:
        raise ConfigError(
            f"noise_mask must lie in [0, 1] (a fraction of windows), got {noise_mask}"
        )
    vocab_ids = None
    if init is not None:
        config = _init_config(init, config)
        vocab_ids = init.vocab_ids.cpu() if config.prediction == "tokens" else None
    elif config.prediction == "tokens":
        vocab_ids = token_vocabulary(data)
        if config.vocab_size not in (0, len(vocab_ids)):
            raise ConfigError(
                f"vocab_size {config.vocab_size} != the {len(vocab_ids)} distinct tokens of "
                f"{data.source}; leave it 0 to take it from the data"
            )
        config = replace(config, vocab_size=len(vocab_ids))
    identity = identity_of(
        config,
        optim,
        data=data.source,
        windows=len(data),
        kind="denoiser",
        train_times=train_times,
        init=None if init is None else weights_digest(init),
        **({"noise_mask": noise_mask} if noise_mask else {}),
    )
    torch.manual_seed(optim.seed)
    den = Denoiser(config, vocab_ids)
    if init is not None:
        missing, unexpected = den.load_state_dict(init.state_dict(), strict=False)
        new = ("state_", "lm_gain")  # the inputs an unconditioned denoiser lacks
        if unexpected or any(not k.startswith(new) for k in missing):
            raise ConfigError(
                f"the --init denoiser's weights do not fit: missing {missing}, unexpected "
                f"{unexpected}"
            )
    den = den.bind_embeddings(base.space).to(device)
    run = Optimisation(den, optim, state_path(out_dir, DENOISER_STEM), identity, world)
    loss_terms = run.parallel(WindowLoss(den))
    rows = world.rows(optim.batch_size)  # this rank's share of every global batch
    times = None
    if train_times == "warp":
        times = OnlineTimeWarp(init.config.time_grid if init is not None else None)
        run.track("time_warp", times)
    history: list[dict[str, Any]] = []
    if resume:
        history = resumed_history(out_dir, DENOISER_STEM, run.resume())
    ids_all, space = data.ids, base.space
    val_ids, val_states = None, None
    if holdout is not None:
        val_ids = holdout.ids[:VAL_WINDOWS]
        if config.reads_states:
            val_ids, offset = crop_windows(None, val_ids, window, fixed=True)
            val_states = WindowStates(holdout.states[:VAL_WINDOWS], offset)
    started = time.perf_counter()
    bar = tqdm(
        total=optim.steps,
        initial=run.step,
        desc="denoiser",
        disable=not (progress and world.is_main),
    )
    while run.step < optim.steps:
        den.train()
        gen = step_generator(optim.seed, run.step)
        idx, t = batch_draws(gen, len(ids_all), optim.batch_size)
        if times is not None:
            t = T_MIN + (1 - T_MIN) * times.draw((t - T_MIN) / (1 - T_MIN))
        ids, seq_states = ids_all[idx], None
        if config.reads_states:
            ids, offset = crop_windows(gen, ids, window)
            seq_states = WindowStates(data.states[idx], offset)
        z0 = space.embed(ids.to(device))
        eps = torch.randn(z0.shape, generator=gen).to(device)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # dropout
        cond = draw_conditioning(gen, config, optim.batch_size, window)
        if seq_states is not None:
            prefix = 0 if cond.clean_mask is None else cond.clean_mask.sum(dim=1)
            cond.states, cond.states_mask = seq_states.before(prefix, config.prefix_states, device)
        t_in, masked = t, torch.zeros(optim.batch_size, dtype=torch.bool)
        if noise_mask:
            t_in, masked = noise_mask_times(gen, t, window, noise_mask)
        with autocast(device):
            t_in = t_in.to(device)
            total, count = loss_terms(ids[rows], z0[rows], t_in[rows], eps[rows], cond.rows(rows))
            # the global batch's mean over positions: this rank's sum over the count of all
            # ranks, times the ranks (their gradients are averaged)
            counted = world.sum(count.sum().detach()).clamp_min(1)
            loss = total.sum() * world.size / counted
        shown = (world.sum(total.sum().detach()) / counted).item()
        if times is not None:  # the warp's curve is over one time per window
            per = world.all_rows(total.detach() / count.clamp_min(1), optim.batch_size)
            keep = (world.all_rows(count, optim.batch_size).cpu() > 0) & ~masked
            times.observe(t[keep], per[keep.to(per.device)])
        lr = run.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{shown:.4f}")
        record: dict[str, Any] = {"step": run.step, "loss": shown, "lr": lr}
        last = run.step == optim.steps
        if holdout is not None and world.is_main and (run.step % optim.val_every == 0 or last):
            with run.averaged():
                den.eval()
                record.update(validate(den, base, val_ids, states=val_states))
            if times is not None:
                record["train_times_above_0.9"] = float((times.grid > 0.9).float().mean())
            log.info("step %d %s", run.step, {k: round(v, 4) for k, v in record.items()})
        history.append(record)
        if (run.step % optim.save_every == 0 or last) and world.is_main:
            with run.averaged():
                save_model(den, out_dir, DENOISER_STEM, space=space, base_model=base.name)
            write_json_atomic(history_path(out_dir, DENOISER_STEM), history)
            run.save()
    bar.close()
    final = Denoiser(config)
    final.load_state_dict(run.final_state_dict())
    final.bind_embeddings(base.space).to(device)
    if warp and holdout is not None and world.is_main:
        warp_ids, warp_states = holdout.ids, None
        if config.reads_states:
            warp_ids, offset = crop_windows(None, holdout.ids, window, fixed=True)
            warp_states = WindowStates(holdout.states, offset)
        curve = measure_time_warp(final, base, warp_ids, seed=optim.seed, states=warp_states)
        final.config = replace(final.config, time_grid=curve["grid"])
        save_model(final, out_dir, DENOISER_STEM, space=space, base_model=base.name)
        history.append({"step": run.step, "time_warp": curve})
        write_json_atomic(history_path(out_dir, DENOISER_STEM), history)
        log.info("time warp: %s", curve["grid"])
    world.barrier()  # rank 0's files are whole when any rank returns
    return DenoiserRun(final.eval(), history, time.perf_counter() - started)


def _check_state_data(data: TokenDataset, config: DenoiserConfig) -> None:
    if data.states is None:
        raise ConfigError(
            f"a denoiser with prefix_states reads base-model states, and {data.source} was "
            "loaded without them: make the data with `fastdia make-data --states`"
        )
    if data.states.shape[2] != config.state_dim:
        raise ConfigError(
            f"{data.source} holds states of width {data.states.shape[2]}, the config asks "
            f"state_dim {config.state_dim}"
        )
    if data.length < config.max_length:
        raise ConfigError(
            f"{data.source} holds sequences of {data.length} tokens, shorter than the "
            f"window of {config.max_length}"
        )


_ARCH_FIELDS = ("dim", "max_length", "hidden", "layers", "heads", "prediction", "schedule", "arch")
_INPUT_FIELDS = ("self_condition", "clean_prompt")


def _init_config(init: Denoiser, config: DenoiserConfig) -> DenoiserConfig:
    """``config`` with ``init``'s token subset, after checking ``init`` has its shape."""
    diff = [
        f"{k} {getattr(init.config, k)!r} (asked: {getattr(config, k)!r})"
        for k in _ARCH_FIELDS + _INPUT_FIELDS
        if getattr(init.config, k) != getattr(config, k)
    ]
    if init.config.reads_states and (init.config.prefix_states, init.config.state_dim) != (
        config.prefix_states,
        config.state_dim,
    ):
        diff.append(f"prefix_states {init.config.prefix_states} (asked: {config.prefix_states})")
    if diff:
        raise ConfigError(
            "the --init denoiser differs from the asked architecture in "
            + ", ".join(diff)
            + "; pass the same architecture options it was trained with"
        )
    return replace(config, vocab_size=init.config.vocab_size)


def weights_digest(module: torch.nn.Module) -> str:
    """A short SHA-256 of a module's state (names, shapes and bytes), for run identities."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(
            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]
