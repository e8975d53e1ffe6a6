"""Assembling a sampler from a base model, a checkpoint (or random models) and rewards.

This is what ``fastdia sample`` does, as a Python function for pipelines:
:func:`build_sampler` validates everything cheap first, then loads, so that bad input
fails before any heavy work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdia.base_model import BaseModel
from fastdia.decode import DecodeConfig
from fastdia.errors import CheckpointError, ConfigError
from fastdia.models.checkpoint import (
    DENOISER_STEM,
    Checkpoint,
    load_checkpoint,
    sampling_defaults,
)
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.models.proposal import AmortisedProposal, ProposalConfig
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.settings import SAMPLING_KEYS

log = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo"
NO_CHECKPOINT_HELP = (
    "no trained checkpoint was given and this installation ships no demo checkpoint; pass "
    "--checkpoint FOLDER (a folder with denoiser.* and critic-*.* files, as written by "
    "`fastdia train-denoiser` and `fastdia train-critic`), or --random-init to run the "
    "whole path on untrained models"
)
RANDOM_INIT_SEED = 0


def resolve_checkpoint(folder: str | Path | None) -> Path:
    """``folder`` checked, or the shipped demo checkpoint when ``folder`` is None."""
    if folder is None:
        if not (DEMO_CHECKPOINT / f"{DENOISER_STEM}.json").is_file():
            raise CheckpointError(NO_CHECKPOINT_HELP)
        folder = DEMO_CHECKPOINT
    return check_checkpoint_folder(folder)


def check_checkpoint_folder(folder: str | Path) -> Path:
    """Cheap existence checks of a checkpoint folder (no loading)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; {NO_CHECKPOINT_HELP}")
    for suffix in (".json", ".safetensors"):
        if not (folder / f"{DENOISER_STEM}{suffix}").is_file():
            raise CheckpointError(
                f"checkpoint folder {folder} has no {DENOISER_STEM}{suffix}; "
                "re-save the checkpoint or train a denoiser into it"
            )
    return folder


def random_models(
    base: BaseModel, rewards: Sequence[str], *, length: int, device: torch.device | str = "cpu"
) -> tuple[Denoiser, dict[str, torch.nn.Module]]:
    """An untrained denoiser and one untrained token-local critic per reward name.

    Deterministic (seeded with a fixed seed), for trying the whole path without training.
    """
    dim = base.space.dim
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        denoiser = Denoiser(
            DenoiserConfig(dim=dim, max_length=max(64, length), hidden=128, layers=2, heads=4)
        )
        critics = {r: build_critic(CriticConfig(dim=dim, hidden=64, reward=r)) for r in rewards}
    finally:
        torch.random.set_rng_state(gen_state)
    return denoiser.to(device).eval(), {k: v.to(device).eval() for k, v in critics.items()}


def random_proposal(
    base: BaseModel, rewards: Sequence[str], *, device: torch.device | str = "cpu"
) -> AmortisedProposal:
    """An untrained amortised proposal with one head per reward name (seeded, like
    :func:`random_models`)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        proposal = AmortisedProposal(ProposalConfig(dim=base.space.dim, rewards=list(rewards)))
    finally:
        torch.random.set_rng_state(gen_state)
    return proposal.to(device).eval()


@dataclass
class Assembly:
    """A built sampler and the names/weights of the critics it guides with."""

    sampler: Sampler
    critics: list[WeightedCritic]


def build_sampler(
    base: BaseModel,
    config: SamplerConfig,
    *,
    rewards: Sequence[tuple[str, float]] = (),
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    length: int = 32,
    device: torch.device | str = "cpu",
    loaded: Checkpoint | None = None,
    reward: Callable[[list[str]], Any] | None = None,
) -> Assembly:
    """Build a :class:`Sampler` guided by one critic per ``(reward name, weight)``.

    Args:
        base: the loaded base model.
        config: sampler settings.
        rewards: ``(canonical reward spec, weight)`` pairs; each needs a critic when the
            critics guide (guidance above 0, ``guidance_estimator="critic"``); otherwise
            those the checkpoint has are kept for their values (none under ``"zo"``), and a
            reward without one is fine.
        checkpoint: a checkpoint folder; None means the shipped demo checkpoint.
        random_init: use untrained models instead of a checkpoint.
        length: the sequence length to be sampled (sizes a random denoiser).
        device: where to run.
        loaded: ``checkpoint`` already loaded (by :func:`load_checkpoint`), to build
            several samplers over one copy of its models.
        reward: the true reward (texts -> one number each) for SMC's reward weighting
            (``config.smc_reward_weight``) and zeroth-order guidance; :class:`Sampler`'s
            ``reward``.

    Raises:
        CheckpointError: no checkpoint and no ``random_init``, a missing critic, or a
            checkpoint of another base model.
    """
    names = [name for name, _ in rewards]
    use_proposal = config.guidance_estimator == "proposal"  # it guides; critics tilt
    proposal = None
    if random_init:
        denoiser, critics = random_models(base, names, length=length, device=device)
        if use_proposal and names:
            proposal = random_proposal(base, names, device=device)
    else:
        checkpoint = resolve_checkpoint(checkpoint)
        ckpt = loaded or load_checkpoint(checkpoint, base.space, device=device)
        denoiser, critics = ckpt.denoiser, ckpt.critics_of(config.critic_kind)
        if config.guidance and config.guidance_estimator == "critic":
            check_critics(checkpoint, critics, names, config.critic_kind)
        proposal = ckpt.proposal if use_proposal else None
        if use_proposal and proposal is None:
            raise CheckpointError(
                f"checkpoint {checkpoint} has no amortised proposal (proposal.*): train one "
                f"with `fastdia train-proposal --data DATA --out {checkpoint}`, or guide with "
                "the critics (--guidance-estimator critic)"
            )
    if config.guidance and not rewards:
        raise ConfigError("guidance needs at least one reward (--reward NAME)")
    weighted = [WeightedCritic(name, critics[name], w) for name, w in rewards if name in critics]
    if config.guidance_estimator == "zo":  # the reward's own gradient estimate guides
        weighted = []
    weights = proposal.reward_weights(rewards) if proposal is not None else None
    sampler = Sampler(
        denoiser,
        base.space,
        weighted,
        config,
        device=device,
        base_model=base,
        reward=reward,
        reward_name=", ".join(names) or "reward",
        proposal=proposal,
        proposal_weights=weights,
    )
    return Assembly(sampler, weighted)


def check_critics(
    checkpoint: Path, critics: Collection[str], names: Sequence[str], kind: str = "token_local"
) -> None:
    """Raise CheckpointError unless the checkpoint has a critic of ``kind`` (its
    ``critic_kind``) for every reward name."""
    missing = [n for n in names if n not in critics]
    if missing:
        have = ", ".join(sorted(critics)) or "none"
        what, train = ("value critic", " --kind value") if kind == "value" else ("critic", "")
        raise CheckpointError(
            f"checkpoint {checkpoint} has no {what} for {', '.join(missing)} "
            f"(its {what}s: {have}); train one with `fastdia train-critic --reward "
            f"{missing[0]}{train}`, pick a reward it has, or steer by the reward itself "
            "with no critic: --guidance 0 --decode lm --particles P --smc-twist reward "
            "--smc-reward-weight W"
        )


def sampling_settings(
    checkpoint: Path | None, reward: str | None = None, **given: Any
) -> dict[str, Any]:
    """The sampling settings of a run: ``given`` (values not None) over the checkpoint's
    ``sampling.json`` (its per-reward defaults for the guiding ``reward`` spec, where it
    has them) over the built-in defaults of :data:`~fastdia.settings.SAMPLING_KEYS`
    (``--random-init``: no checkpoint).

    Returns every sampling key plus the ``given`` ones.
    """
    settings = {key: spec.default for key, spec in SAMPLING_KEYS.items()}
    if checkpoint is not None:
        defaults = sampling_defaults(checkpoint, reward)
        settings.update({k: v for k, v in defaults.items() if k in SAMPLING_KEYS})
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def sampler_config(settings: dict[str, Any], **extra: Any) -> SamplerConfig:
    """A :class:`SamplerConfig` from :func:`sampling_settings` (``extra``: other fields).

    Raises:
        ConfigError: a value out of range, or an LM-decode setting without ``decode="lm"``.
    """
    decode = DecodeConfig(
        temperature=settings["lm_temperature"],
        latent_weight=settings["latent_weight"],
        tilt=settings["tilt"],
        tilt_once=settings["tilt_once"],
        tilt_horizon=settings["tilt_horizon"],
    )
    return SamplerConfig(
        sampler=settings["sampler"],
        steps=settings["steps"],
        guidance=settings["guidance"],
        decode=settings["decode"],
        stop_at=settings["stop_at"],
        score_temperature=settings["score_temperature"],
        lm=decode,
        block_size=settings["block_size"] or None,
        on_eos=settings["on_eos"],
        critic_kind=settings["critic_kind"],
        noise_kappa=settings["adaptive_noise"],
        particles=settings["particles"],
        ess_threshold=settings["ess_threshold"],
        smc_twist=settings["smc_twist"],
        smc_reward_weight=settings["smc_reward_weight"],
        guidance_estimator=settings["guidance_estimator"],
        zo_samples=settings["zo_samples"],
        zo_sigma=settings["zo_sigma"],
        corrector_steps=settings["corrector_steps"],
        corrector_snr=settings["corrector_snr"],
        mh_steps=settings["mh_steps"],
        mh_snr=settings["mh_snr"],
        **extra,
    )
