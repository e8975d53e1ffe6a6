"""The guided sampler (docs/design.md §1-2): text of any length in blocks, plan separated from run.

``Sampler.plan(B, new_tokens)`` builds everything static for a batch shape: the block
diffusion over the denoiser's window (:class:`fastdia.window.WindowDiffusion`: the
coefficient table, time embeddings, critic stack and state buffers), the LM decode's
static KV cache and step (:class:`fastdia.decode.DecodePlan`), and the buffers they
share (:class:`fastdia.window.BlockState`: the left-padded token buffer, the per-row
seeds and prompt lengths, the generated count). ``SamplerPlan.run(prompts, seed)``
encodes the prompts (one for every row, or one per row, of any lengths), copies them in
and runs the block loop::

    write every row's prompt into the token buffer, left-padded; generated = 0
    LM prefill of the prompts (one eager forward)
    for block j in 0 .. ceil(N / K) - 1:
        guided reverse diffusion of the block's K positions in each row's window,
            the row's last W - K tokens as its clean context       (WindowDiffusion)
        LM decode of the block's K tokens from the latent at t*, continuing the KV cache
            (or: round the block's latent to tokens, decode "nearest")
    cut each row at its first end token (on_eos "stop"); decode the texts

Every block runs the same static-shape diffusion and every token the same decode step,
reading their positions from device counters, so on CUDA one captured graph is replayed
for every block and another for every token (``SamplerConfig.cuda_graph``); on the CPU
:mod:`fastdia.strict` checks that the whole block loop creates no tensor from host data
and reads nothing back. With ``latent_weight = 0`` the LM decode does not read the latent
and no diffusion runs: the tilt-only (critic-weighted) decode.

Seeds are per row: row ``b`` draws all its noise under its own seed (``seed + b`` for one
``seed``), numbered within the row, so the same prompt and seed give the same text
whatever else shares the batch, on every backend up to float rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdia import ops
from fastdia.base_model import BaseModel
from fastdia.decode import DECODES, DecodeConfig, LMDecoder, check_positive
from fastdia.embedding import ROUNDINGS, EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.critic import TokenLocalCritic
from fastdia.models.denoiser import Denoiser
from fastdia.models.proposal import AmortisedProposal
from fastdia.ops import registry
from fastdia.plan import SamplerPlan
from fastdia.prompts import ON_EOS, Prompt, SpecialTokens, encode_prompt, special_tokens
from fastdia.run_checks import check_block_size, check_new_tokens, check_seed, check_window
from fastdia.sample_output import SampleOutput
from fastdia.schedules import SAMPLERS, check_choice, check_langevin_rows, check_stop
from fastdia.settings import SAMPLING_KEYS, check_guidance
from fastdia.smc import check_particles, check_smc_reward
from fastdia.zeroth_order import check_zero_order

log = logging.getLogger(__name__)

CRITIC_KINDS_GUIDING = ("token_local", "value")  # SamplerConfig.critic_kind
PROMPT_BUCKET = 32  # prompt capacities are rounded up to a multiple of this (plan reuse)


_DEFAULT = {key: spec.default for key, spec in SAMPLING_KEYS.items()}


@dataclass
class SamplerConfig:
    """How to sample.

    Attributes:
        sampler: ``"ddpm"``, ``"ddim"`` or ``"dia"`` (see :mod:`fastdia.schedules`).
        steps: predictor steps ``S``.
        guidance: ``lambda`` >= 0, the strength of the critic gradient.
        rounding: ``"l2"`` (nearest embedding) or ``"inner"`` (max inner product).
        clamp_from: if set, from predictor step ``clamp_from`` on (1-based, counted from
            the start of the run) the x0 estimate is replaced by the embedding of its
            rounding.
        corrector_steps: Langevin corrector rows after each predictor row but the last.
        corrector_snr: the corrector's signal-to-noise ratio.
        eta_scale: multiplier of the ``dia`` Langevin step.
        noise_kappa: adaptive noise ``s_t exp(-kappa h(z_t))``; 0 disables it.
        backend: op variant name, ``"auto"``, or None (``$FASTDIA_BACKEND`` or auto).
        time_warp: place the steps by the denoiser's measured ``time_grid`` (if it has
            one); False: evenly in ``t``.
        score_temperature: temperature of a ``"tokens"`` denoiser's distribution (< 1
            sharpens the x0 estimate).
        stop_at: the level ``t*`` in ``[0, 1)`` the diffusion stops at.
        decode: ``"nearest"`` (round to the nearest embedding) or ``"lm"`` (sample from
            the base model times the latent's likelihood: :mod:`fastdia.decode`).
        lm: the LM decode's weights (:class:`fastdia.decode.DecodeConfig`).
        self_condition: feed the previous x0 estimate back (when the denoiser was trained
            for it); False runs such a denoiser without (an ablation).
        clean_prompt: give the prompt clean and masked (when the denoiser was trained for
            it); False writes it noised to each level instead (an ablation).
        cuda_graph: on a CUDA device, capture each plan's block diffusion (denoiser
            included) and its decode step as CUDA graphs and replay them for every block
            and token; no effect elsewhere.
        block_size: ``K``, tokens per block (None: half the window); at most the window.
        window: ``W``, the positions the denoiser sees per block, context included (None:
            its ``max_length``, what it was trained on).
        on_eos: ``"stop"`` (a row ends at its first end-of-text / end-of-turn token) or
            ``"mask"`` (those tokens are never drawn); see :mod:`fastdia.prompts`.
        noise_latent: an ablation: no diffusion runs, the decode reads pure noise (each
            block's ``z_T``) where the guided latent would be.
        critic_kind: which of a checkpoint's critics guide: ``"token_local"`` (the
            ``critic-*`` files; token-local or context critics) or ``"value"`` (the
            ``value-*`` files: value critics that read the base model's states);
            :func:`fastdia.pipeline.build_sampler` picks them.
        particles: with more than 1, twisted SMC over blocks (:mod:`fastdia.smc`): each
            group of ``particles`` consecutive rows (one prompt) is one particle system,
            weighted toward the decode's exact tilted target and resampled; 1: no SMC.
        ess_threshold: SMC resamples a group whose effective sample size falls under
            ``ess_threshold x particles``; in ``(0, 1]``.
        smc_twist: what weighs SMC's particles between blocks: ``"critic"`` (the critics'
            per-token tilt, :mod:`fastdia.smc`) or ``"reward"`` (the true reward of each
            particle's text so far times ``smc_reward_weight``; the sampler's ``reward``).
        smc_reward_weight: ``W >= 0``: SMC targets the base model (at the decode's
            temperature) times ``exp(W r(x))``, ``r`` the sampler's ``reward`` of the
            finished text (the last weighting replaces the twist by it); 0: the critics'
            tilted target. ``smc_twist="reward"`` needs ``W > 0``.
        guidance_estimator: what gives the gradient the diffusion is guided by:
            ``"critic"`` (the critics'), ``"zo"`` (a zeroth-order estimate from the
            sampler's ``reward`` itself, no critic: :mod:`fastdia.zeroth_order`) or
            ``"proposal"`` (an amortised proposal's prediction of the critics' gradient:
            :mod:`fastdia.models.proposal`).
        zo_samples: ``Q``, the reward calls per row and step of the ``"zo"`` estimate (an
            even number: ``Q / 2`` antithetic pairs).
        zo_sigma: the ``"zo"`` smoothing scale, in the units of the scaled embeddings (an
            embedding's elements have unit RMS).
        mh_steps: Metropolis-adjusted Langevin rows after each predictor row (and its
            corrector rows) but the last (:mod:`fastdia.mala`); 0: none.
        mh_snr: their signal-to-noise ratio (step ``2 mh_snr^2 sigma^2``).
    """

    sampler: str = _DEFAULT["sampler"]
    steps: int = _DEFAULT["steps"]
    guidance: float = _DEFAULT["guidance"]
    rounding: str = "l2"
    clamp_from: int | None = None
    corrector_steps: int = _DEFAULT["corrector_steps"]
    corrector_snr: float = _DEFAULT["corrector_snr"]
    eta_scale: float = 1.0
    noise_kappa: float = _DEFAULT["adaptive_noise"]
    backend: str | None = None
    time_warp: bool = True
    score_temperature: float = _DEFAULT["score_temperature"]
    stop_at: float = _DEFAULT["stop_at"]
    decode: str = _DEFAULT["decode"]
    lm: DecodeConfig = field(default_factory=DecodeConfig)
    self_condition: bool = True
    clean_prompt: bool = True
    cuda_graph: bool = True
    block_size: int | None = None
    window: int | None = None
    on_eos: str = _DEFAULT["on_eos"]
    noise_latent: bool = False
    critic_kind: str = _DEFAULT["critic_kind"]
    particles: int = _DEFAULT["particles"]
    ess_threshold: float = _DEFAULT["ess_threshold"]
    smc_twist: str = _DEFAULT["smc_twist"]
    smc_reward_weight: float = _DEFAULT["smc_reward_weight"]
    guidance_estimator: str = _DEFAULT["guidance_estimator"]
    zo_samples: int = _DEFAULT["zo_samples"]
    zo_sigma: float = _DEFAULT["zo_sigma"]
    mh_steps: int = _DEFAULT["mh_steps"]
    mh_snr: float = _DEFAULT["mh_snr"]

    def __post_init__(self) -> None:
        check_choice(self.critic_kind, CRITIC_KINDS_GUIDING, "critic_kind")
        check_choice(self.sampler, SAMPLERS, "sampler")
        check_choice(self.decode, DECODES, "decode")
        check_stop(self.stop_at)
        check_positive(self.score_temperature, "score_temperature")
        if self.noise_latent and self.decode != "lm":
            raise ConfigError("noise_latent is an ablation of the LM decode: use decode='lm'")
        if self.decode == "lm" and self.lm.latent_weight and self.stop_at == 0:
            raise ConfigError(
                "--decode lm reads the latent at a noise level: give a stop level t* in "
                "(0, 1) with --stop-at (or --latent-weight 0 to decode without the latent)"
            )
        check_choice(self.rounding, ROUNDINGS, "rounding")
        check_choice(self.on_eos, ON_EOS, "on_eos")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise ConfigError(f"window must be a positive integer, got {self.window!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        check_guidance(self.guidance)
        check_particles(self.particles, self.ess_threshold)
        check_smc_reward(self.smc_twist, self.smc_reward_weight, self.particles)
        check_zero_order(self.guidance_estimator, self.zo_samples, self.zo_sigma)
        check_langevin_rows(self.corrector_steps, self.corrector_snr, "corrector")
        check_langevin_rows(self.mh_steps, self.mh_snr, "mh")
        if self.mh_steps and (self.guidance_estimator != "critic" or self.noise_kappa):
            raise ConfigError(
                "MALA rows (mh_steps > 0) accept against the critics' value and the plain "
                "Langevin noise: zeroth-order guidance and the amortised proposal (no critic "
                "value) and adaptive noise are not supported with them; drop one"
            )
        if self.guidance_estimator != "critic" and (
            self.noise_kappa or self.critic_kind == "value"
        ):
            raise ConfigError(
                f"guidance_estimator={self.guidance_estimator!r} guides the diffusion with no "
                "critic: adaptive noise and critic_kind='value' read one; drop them"
            )
        if self.particles > 1 and self.decode != "lm":
            raise ConfigError(
                "SMC (particles > 1) weighs the LM decode's draws: use decode='lm' (--decode lm)"
            )
        if self.clamp_from is not None and not 1 <= self.clamp_from <= self.steps:
            raise ConfigError(
                f"clamp_from must be in [1, steps={self.steps}], got {self.clamp_from}"
            )
        if not math.isfinite(self.noise_kappa) or self.noise_kappa < 0:
            raise ConfigError(f"noise_kappa must be a finite number >= 0, got {self.noise_kappa}")
        if self.noise_kappa and self.critic_kind == "value":
            raise ConfigError(
                "adaptive noise scales each row's noise by the fused token-local critic's "
                "value; with critic_kind='value' there is none: drop --adaptive-noise or use "
                "the token-local critics"
            )


@dataclass
class WeightedCritic:
    """A critic with its name (the reward spec it imitates) and its weight."""

    name: str
    module: nn.Module
    weight: float = 1.0


def decode_backend(backend: str | None, device: torch.device) -> str:
    """The ``sample_vocab`` variant the LM decode draws with for the requested ``backend``:
    the same name where ``sample_vocab`` has it, else ``auto``'s choice, with a warning
    naming the substitution (``cuda`` has no ``sample_vocab`` kernel today)."""
    op, asked = ops.SAMPLE_VOCAB, registry.requested(backend)
    if asked == registry.AUTO or asked in registry.backends(op):
        return registry.resolve_backend(asked, op, device)
    chosen = registry.resolve_backend(registry.AUTO, op, device)
    log.warning(
        "%s has no %r variant: the LM decode draws with %r (known: %s)",
        op,
        asked,
        chosen,
        ", ".join(registry.backends(op)),
    )
    return chosen


def prompt_capacity(longest: int) -> int:
    """The prompt capacity of a plan for prompts of up to ``longest`` tokens (at least one:
    an empty prompt is the start token), rounded up to a multiple of PROMPT_BUCKET."""
    return max(1, math.ceil(max(longest, 1) / PROMPT_BUCKET) * PROMPT_BUCKET)


class Sampler:
    """Guided sampler over a denoiser, an embedding space and weighted critics.

    Args:
        denoiser: the trained (or random) :class:`~fastdia.models.denoiser.Denoiser`.
        space: the base model's embedding space (same fingerprint as the models).
        critics: weighted critics; token-local ones are merged into one fused stack,
            context critics contribute an autograd gradient.
        config: :class:`SamplerConfig`.
        device: where to run; defaults to the denoiser's device.
        base_model: the base LM, needed by ``decode="lm"`` (same embeddings as ``space``).
        reward: the true reward that SMC's reward weighting (``config.smc_reward_weight``)
            and zeroth-order guidance read: a callable from ``B`` texts (what
            :attr:`SampleOutput.texts` holds) to ``B`` finite numbers (a tensor, array or
            list); any Python function will do, no critic needed.
        reward_name: its name in error messages.
        proposal: the amortised proposal that guides under
            ``config.guidance_estimator="proposal"`` (ignored otherwise).
        proposal_weights: ``[R]`` its heads' weights, one per ``proposal.config.rewards``
            (:meth:`AmortisedProposal.reward_weights` of the run's reward mixture).

    Attributes:
        window: ``W``, the denoiser's window (``config.window``, else its ``max_length``).
        block_size: ``K``, tokens per block.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        space: EmbeddingSpace,
        critics: Sequence[WeightedCritic] = (),
        config: SamplerConfig | None = None,
        device: torch.device | str | None = None,
        *,
        base_model: BaseModel | None = None,
        reward: Callable[[list[str]], Any] | None = None,
        reward_name: str = "reward",
        proposal: AmortisedProposal | None = None,
        proposal_weights: torch.Tensor | None = None,
    ) -> None:
        self.config = config = config or SamplerConfig()
        readers = []  # what reads the true reward
        if config.particles > 1 and config.smc_reward_weight:
            readers.append("smc_reward_weight weighs SMC's particles by it")
        if config.guidance_estimator == "zo":
            readers.append("zeroth-order guidance scores its candidates with it")
        if readers and reward is None:
            raise ConfigError(
                f"{'; '.join(readers)}: pass reward= (a callable from texts to one number "
                "each) to the Sampler (fastdia.pipeline.build_sampler passes the run's --reward)"
            )
        if (
            config.guidance_estimator == "zo"
            and config.decode == "lm"
            and not config.lm.latent_weight
        ):
            raise ConfigError(
                "zeroth-order guidance steers the diffusion's latent, and with latent_weight 0 "
                "no diffusion runs: give --latent-weight > 0 or --decode nearest"
            )
        self.reward, self.reward_name = reward, reward_name
        self.device = torch.device(device) if device else next(denoiser.parameters()).device
        if denoiser.config.dim != space.dim:
            raise ConfigError(
                f"denoiser width {denoiser.config.dim} != embedding width {space.dim}: "
                "the denoiser belongs to another base model"
            )
        self.proposal: AmortisedProposal | None = None
        self.proposal_weights: torch.Tensor | None = None
        if config.guidance_estimator == "proposal":
            if proposal is None or proposal_weights is None:
                raise ConfigError(
                    "guidance_estimator='proposal' needs proposal= and proposal_weights= "
                    "(fastdia.pipeline.build_sampler loads the checkpoint's proposal.*, "
                    "trained by `fastdia train-proposal`)"
                )
            if proposal.config.dim != space.dim:
                raise ConfigError(
                    f"proposal width {proposal.config.dim} != embedding width {space.dim}: "
                    "the proposal belongs to another base model"
                )
            if proposal_weights.shape != (len(proposal.config.rewards),):
                raise ConfigError(
                    f"proposal_weights must hold one weight per reward of the proposal "
                    f"({len(proposal.config.rewards)}), got shape {list(proposal_weights.shape)}"
                )
            self.proposal = proposal.to(self.device).eval()
            self.proposal_weights = proposal_weights.float()
        self.window = check_window(config.window, denoiser.config.max_length)
        self.block_size = check_block_size(config.block_size, self.window)
        self.denoiser = denoiser.to(self.device).eval()
        self.space = space.to(self.device)
        self.critics = [
            WeightedCritic(c.name, c.module.to(self.device).eval(), c.weight) for c in critics
        ]
        self.backends = {
            op: registry.resolve_backend(config.backend, op, self.device) for op in ops.SAMPLER_OPS
        }
        if config.decode == "lm":  # the decode's draw, bound once (see decode_backend)
            self.backends[ops.SAMPLE_VOCAB] = decode_backend(config.backend, self.device)
        self._plans: dict[tuple[int, int, int], SamplerPlan] = {}
        self.decoder: LMDecoder | None = None
        self.state_dim = self._state_width(denoiser, critics) if self.diffuses else 0
        reads_states = self.state_dim > 0
        if config.decode == "lm" or reads_states:
            if base_model is None:
                why = (
                    'decode="lm" samples with the base model'
                    if config.decode == "lm"
                    else "the denoiser or a critic reads the base model's states"
                )
                raise ConfigError(
                    f"{why}: pass base_model= to Sampler (fastdia.pipeline.build_sampler does)"
                )
            space.check_fingerprint(base_model.space.fingerprint, "the LM decode's base model")
            if reads_states and base_model.hidden_size != self.state_dim:
                raise ConfigError(
                    f"the denoiser or a critic reads base-model states of width "
                    f"{self.state_dim}, and {base_model.name} gives "
                    f"{base_model.hidden_size}: use the base model they were trained with"
                )
            # a nearest decode runs the base model only to read the states of its blocks
            lm = config.lm if config.decode == "lm" else DecodeConfig(latent_weight=0.0)
            self.decoder = LMDecoder(base_model, lm, self.backends)
        lm = self.decoder.base.model if self.decoder is not None else None  # loaded by the decode
        generation = getattr(lm, "generation_config", None)
        self.special: SpecialTokens = special_tokens(
            space.tokenizer, generation, on_eos=config.on_eos
        )

    @staticmethod
    def _state_width(denoiser: Denoiser, critics: Sequence[WeightedCritic]) -> int:
        """The width of the base-model states the denoiser and critics read (0: none)."""
        readers = [("the denoiser", denoiser.config)] + [
            (f"the {c.name} critic", c.module.config) for c in critics
        ]
        widths = {(who, cfg.state_dim) for who, cfg in readers if cfg.reads_states}
        if len({w for _, w in widths}) > 1:
            raise ConfigError(
                "the denoiser and critics read base-model states of different widths ("
                + ", ".join(f"{who}: {w}" for who, w in sorted(widths))
                + "): they belong to different base models"
            )
        return next(iter(widths))[1] if widths else 0

    @property
    def local_critics(self) -> list[tuple[TokenLocalCritic, float]]:
        """The token-local critics with their weights (the fused stack, the decode's tilt)."""
        return [
            (c.module, c.weight) for c in self.critics if isinstance(c.module, TokenLocalCritic)
        ]

    @property
    def diffuses(self) -> bool:
        """Whether a run diffuses at all: not for an LM decode that ignores the latent."""
        return self.config.decode == "nearest" or bool(self.config.lm.latent_weight)

    def context_length(self) -> int | None:
        """The base model's context in tokens (None without an LM decode)."""
        if self.decoder is None:
            return None
        cfg = self.decoder.base.model.config
        return getattr(cfg, "max_position_embeddings", None)

    def plan(self, batch_size: int, new_tokens: int, *, prompt_tokens: int = 1) -> SamplerPlan:
        """Allocate everything static for ``batch_size`` rows of up to ``new_tokens``
        generated tokens after prompts of up to ``prompt_tokens`` tokens (rounded up: see
        :func:`prompt_capacity`).

        Plans are cached by shape: asking again for the same shape returns the same plan
        (its buffers are reused by every run). On a CUDA device with ``config.cuda_graph``
        the first call also warms the loop up and captures it (:class:`SamplerPlan`).
        """
        if batch_size < 1:
            raise ConfigError(f"need at least one row, got batch_size={batch_size}")
        check_new_tokens(new_tokens, self.context_length(), prompt_tokens)
        blocks = math.ceil(new_tokens / self.block_size)
        key = (batch_size, blocks, prompt_capacity(prompt_tokens))
        if key not in self._plans:
            self._plans[key] = SamplerPlan(self, batch_size, blocks, key[2])
        return self._plans[key]

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """One prompt as token ids (:func:`fastdia.prompts.encode_prompt`)."""
        return encode_prompt(self.space.tokenizer, self.space.vocab_size, prompt, chat=chat)

    def sample(
        self,
        num_samples: int,
        new_tokens: int,
        *,
        prompt: Prompt | Sequence[Prompt] = None,
        seed: int | Sequence[int] = 0,
        chat: bool = False,
    ) -> SampleOutput:
        """Plan and run once: ``num_samples`` rows of ``new_tokens`` after ``prompt`` (one
        prompt for every row, or a list of one per row)."""
        rows = self._prompt_rows(prompt, num_samples, chat)
        plan = self.plan(num_samples, new_tokens, prompt_tokens=max(len(r) for r in rows))
        return plan.run(rows, seed=seed, new_tokens=new_tokens, chat=chat)

    def _prompt_rows(
        self, prompt: Prompt | Sequence[Prompt], rows: int, chat: bool
    ) -> list[list[int]]:
        if _is_prompt_list(prompt):
            if len(prompt) != rows:
                raise ConfigError(
                    f"got {len(prompt)} prompts for {rows} rows: give one or one per row"
                )
            return [self.encode(p, chat=chat) for p in prompt]
        return [self.encode(prompt, chat=chat)] * rows  # type: ignore[arg-type]


def _is_prompt_list(prompt: object) -> bool:
    """Whether ``prompt`` is a list of prompts (not one text, not one list of ids)."""
    if prompt is None or isinstance(prompt, str) or isinstance(prompt, torch.Tensor):
        return False
    items = list(prompt)  # type: ignore[call-overload]
    return bool(items) and all(p is None or isinstance(p, (str, list, tuple)) for p in items)


def sample_rows(
    sampler: Sampler,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    new_tokens: int,
    *,
    batch_size: int = 16,
    chat: bool = False,
    on_batch: Callable[[SampleOutput], None] | None = None,
) -> SampleOutput:
    """Sample one row per ``(prompt, seed)`` in batches of ``batch_size`` rows, all through
    one plan (sized for the longest prompt; a short last batch is padded with copies of its
    last row, which are dropped). Every prompt is encoded and checked before any sampling.

    Returns the rows in order as one :class:`SampleOutput`; ``on_batch`` sees each batch's.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ConfigError(
            f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds"
        )
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            rows.append(sampler.encode(prompt, chat=chat))
        except ConfigError as exc:
            raise ConfigError(f"prompt {i}: {exc}") from None
    seeds = [check_seed(s) for s in seeds]
    batch = min(batch_size, len(rows))
    plan = sampler.plan(batch, new_tokens, prompt_tokens=max(len(r) for r in rows))
    outputs = []
    for first in range(0, len(rows), batch):
        part, part_seeds = rows[first : first + batch], seeds[first : first + batch]
        real = len(part)
        part = part + [part[-1]] * (batch - real)
        part_seeds = part_seeds + [part_seeds[-1]] * (batch - real)
        out = plan.run(part, seed=part_seeds, new_tokens=new_tokens, chat=chat).subset(real)
        if on_batch is not None:
            on_batch(out)
        outputs.append(out)
    return SampleOutput.concat(outputs)
