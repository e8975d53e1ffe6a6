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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdia import ops
from fastdia.base_model import BaseModel
from fastdia.decode import DECODES, DecodeConfig, DecodePlan, LMDecoder, check_positive
from fastdia.device import capture_graph
from fastdia.embedding import ROUNDINGS, EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.critic import TokenLocalCritic
from fastdia.models.denoiser import Denoiser
from fastdia.ops import registry
from fastdia.prompts import ON_EOS, Prompt, SpecialTokens, encode_prompt, special_tokens
from fastdia.schedules import SAMPLERS, check_choice, check_stop
from fastdia.settings import SAMPLING_KEYS, check_guidance
from fastdia.window import BlockState, WindowDiffusion

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2  # eager runs on a side stream before a CUDA graph capture
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
    """

    sampler: str = _DEFAULT["sampler"]
    steps: int = _DEFAULT["steps"]
    guidance: float = _DEFAULT["guidance"]
    rounding: str = "l2"
    clamp_from: int | None = None
    corrector_steps: int = 0
    corrector_snr: float = 0.1
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


@dataclass
class SampleOutput:
    """What a run produced, row by row.

    Attributes:
        prompt_ids: each row's prompt as token ids (the chat template included).
        completion_ids: each row's generated tokens up to its first end token
            (excluded), at most ``new_tokens`` of them.
        completions: the generated texts.
        texts: what a reward reads: the prompt and its continuation, or with ``chat``
            the assistant's reply alone.
        finished: per row, whether it ended at an end token (``on_eos="stop"``).
        seeds: each row's seed.
        tokens: ``[B, new_tokens]`` int64 on the CPU, every generated token (after an end
            token too: those are padding).
        critic_values: critic name -> ``[B]`` float32, each critic on the tokens the
            reward reads.
        z: ``[B, W, d]`` float32, the last block's window state (on the device), at level
            ``t*``; None when no diffusion ran (``latent_weight = 0``).
        seconds: wall time of the run (prefill, every block's diffusion and decode,
            device work finished).
        steps: diffusion table rows per block (predictor and corrector).
        blocks: blocks run.
        paths: which code paths ran (:attr:`SamplerPlan.paths`): the op variants, whether
            the diffusion and the decode step replayed CUDA graphs, the KV cache, the
            decode's output head, the critics in the decode's tilt.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    texts: list[str]
    finished: list[bool]
    seeds: list[int]
    tokens: torch.Tensor
    critic_values: dict[str, torch.Tensor]
    z: torch.Tensor | None
    seconds: float
    steps: int
    blocks: int
    paths: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        """Generated tokens delivered (each row up to its end token)."""
        return sum(len(ids) for ids in self.completion_ids)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens delivered per second (prompt tokens and padding not counted)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def token_ids(self) -> torch.Tensor:
        """``[B, p + new_tokens]`` int64: the prompt followed by every generated token, for
        a batch whose rows share one prompt of ``p`` tokens (a ConfigError otherwise)."""
        first = self.prompt_ids[0]
        if any(p != first for p in self.prompt_ids):
            raise ConfigError("token_ids needs one prompt for every row; use prompt_ids + tokens")
        prompt = torch.tensor(first, dtype=torch.int64).expand(len(self.prompt_ids), -1)
        return torch.cat([prompt, self.tokens], dim=1)

    @staticmethod
    def concat(outputs: Sequence[SampleOutput]) -> SampleOutput:
        """The rows of several runs as one output (times and blocks summed)."""
        first = outputs[0]
        return SampleOutput(
            prompt_ids=[p for o in outputs for p in o.prompt_ids],
            completion_ids=[c for o in outputs for c in o.completion_ids],
            completions=[c for o in outputs for c in o.completions],
            texts=[t for o in outputs for t in o.texts],
            finished=[f for o in outputs for f in o.finished],
            seeds=[s for o in outputs for s in o.seeds],
            tokens=torch.cat([o.tokens for o in outputs]),
            critic_values={
                k: torch.cat([o.critic_values[k] for o in outputs]) for k in first.critic_values
            },
            z=None,
            seconds=sum(o.seconds for o in outputs),
            steps=first.steps,
            blocks=sum(o.blocks for o in outputs),
            paths=first.paths,
        )

    def subset(self, rows: int) -> SampleOutput:
        """The first ``rows`` rows (a batch padded to a plan's size, cut back)."""
        cut = slice(0, rows)
        return SampleOutput(
            prompt_ids=self.prompt_ids[cut],
            completion_ids=self.completion_ids[cut],
            completions=self.completions[cut],
            texts=self.texts[cut],
            finished=self.finished[cut],
            seeds=self.seeds[cut],
            tokens=self.tokens[cut],
            critic_values={k: v[cut] for k, v in self.critic_values.items()},
            z=None if self.z is None else self.z[cut],
            seconds=self.seconds,
            steps=self.steps,
            blocks=self.blocks,
            paths=self.paths,
        )


def _local(critic: WeightedCritic) -> bool:
    return isinstance(critic.module, TokenLocalCritic)


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


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in ``[0, 2**31)``; else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return seed


def row_seed_list(seed: int | Sequence[int], rows: int) -> list[int]:
    """Per-row seeds: ``seed + b`` (mod ``2**31``) for one seed, or ``rows`` given seeds."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        check_seed(seed)
        return [(seed + b) % 2**31 for b in range(rows)]
    seeds = [check_seed(s) for s in seed]
    if len(seeds) != rows:
        raise ConfigError(f"got {len(seeds)} seeds for {rows} rows: give one seed or one per row")
    return seeds


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
    ) -> None:
        self.config = config = config or SamplerConfig()
        self.device = torch.device(device) if device else next(denoiser.parameters()).device
        if denoiser.config.dim != space.dim:
            raise ConfigError(
                f"denoiser width {denoiser.config.dim} != embedding width {space.dim}: "
                "the denoiser belongs to another base model"
            )
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


def check_window(window: int | None, max_length: int) -> int:
    """The denoiser window ``W``: ``window``, or the denoiser's ``max_length``."""
    if window is None:
        return max_length
    if window > max_length:
        raise ConfigError(
            f"a window of {window} tokens exceeds the denoiser's maximum of {max_length}"
        )
    return window


def check_block_size(block_size: int | None, window: int) -> int:
    """The block size ``K`` for a denoiser window ``W``: ``block_size``, or ``W // 2``."""
    if block_size is None:
        return max(1, window // 2)
    if not 1 <= block_size <= window:
        raise ConfigError(
            f"block size {block_size} does not fit the denoiser's window of {window} tokens; "
            f"use --block-size in [1, {window}]"
        )
    return block_size


def check_new_tokens(new_tokens: int, context: int | None, prompt_tokens: int = 0) -> int:
    """``new_tokens`` if it is a positive int that fits the base model's ``context`` after
    ``prompt_tokens``; else a ConfigError naming the limit."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ConfigError(f"--new-tokens must be a positive integer, got {new_tokens!r}")
    if context is not None and prompt_tokens + new_tokens > context:
        raise ConfigError(
            f"--new-tokens {new_tokens} after a prompt of {prompt_tokens} tokens exceeds the "
            f"base model's context of {context} tokens; use --new-tokens <= "
            f"{max(context - prompt_tokens, 0)} or a shorter prompt"
        )
    return new_tokens


class SamplerPlan:
    """The static state of one batch shape; :meth:`run` samples with it.

    Holds the shared buffers (:class:`~fastdia.window.BlockState`: ``B`` rows, prompt
    capacity ``P``, ``blocks x K`` generated tokens), the block diffusion
    (:class:`~fastdia.window.WindowDiffusion`, None when no diffusion runs) and the LM
    decode (:class:`~fastdia.decode.DecodePlan`, None for the nearest decode). On a CUDA
    device with ``SamplerConfig.cuda_graph`` the plan warms both up on a side stream and
    captures the block diffusion and the decode step as CUDA graphs; :meth:`run` copies its
    inputs into the buffers and replays them, once per block and once per token.
    """

    def __init__(self, sampler: Sampler, batch_size: int, blocks: int, prompt_cap: int) -> None:
        cfg = sampler.config
        self.sampler, self.batch_size, self.blocks = sampler, batch_size, blocks
        self.block, self.prompt_cap = sampler.block_size, prompt_cap
        self.device = device = sampler.device
        self.max_new = blocks * self.block
        self.state = BlockState.allocate(
            batch_size,
            prompt_cap,
            self.max_new,
            self.block,
            sampler.space.dim,
            device,
            state_dim=sampler.state_dim,
        )
        banned = sampler.special.banned
        self.diffusion = (
            WindowDiffusion(
                sampler, self.state, sampler.window, banned, nearest=cfg.decode == "nearest"
            )
            if sampler.diffuses
            else None
        )
        self.captures = cfg.cuda_graph and device.type == "cuda"
        self.decode_plan: DecodePlan | None = None
        self.tilt_critics: list[str] = []
        if sampler.decoder is not None:
            abar = self.diffusion.abar_stop if self.diffusion is not None else 0.0
            lm_decode = cfg.decode == "lm"
            beta = cfg.lm.tilt * cfg.guidance / sampler.window if lm_decode else 0.0
            self.tilt_critics = [c.name for c in sampler.critics if beta and _local(c)]
            dropped = [c.name for c in sampler.critics if beta and not _local(c)]
            if dropped:
                log.warning(
                    "the decode's per-token tilt reads token-local critics only: %s guide the "
                    "diffusion but not the tilt",
                    ", ".join(dropped),
                )
            self.decode_plan = sampler.decoder.plan(
                self.state,
                abar,
                sampler.local_critics,
                beta,
                banned,
                graph=self.captures and lm_decode,
            )
        self._graph: torch.cuda.CUDAGraph | None = None
        if self.captures:
            self._capture()

    @property
    def paths(self) -> dict[str, Any]:
        """Which code paths this plan runs (recorded in every :class:`SampleOutput`): the
        op variants (``backends``), whether the block diffusion and the decode step replay
        CUDA graphs, the decode's KV cache (``static`` or ``dynamic``) and output head
        (``tied``: fused draw over the embedding; ``general``: the LM head, then the
        draw), the critics in the decode's tilt."""
        paths: dict[str, Any] = {
            "backends": dict(self.sampler.backends),
            "diffusion_graph": self.graphed,
        }
        if self.decode_plan is not None:
            paths |= {
                "decode_graph": self.decode_plan.graphed,
                "kv_cache": "static" if self.decode_plan.static else "dynamic",
                "decode_head": "tied" if self.decode_plan.tied else "general",
                "tilt_critics": self.tilt_critics,
            }
        return paths

    captures: bool
    """Whether the plan captures its block diffusion and decode step as CUDA graphs (on a
    CUDA device with ``SamplerConfig.cuda_graph``)."""

    @property
    def graphed(self) -> bool:
        """Whether :meth:`run` replays a captured CUDA graph of the block diffusion."""
        return self._graph is not None

    @property
    def steps(self) -> int:
        """Diffusion table rows per block (0 when no diffusion runs)."""
        if self.diffusion is None or self.sampler.config.noise_latent:
            return 0
        return len(self.diffusion.table)

    # ---- inputs -------------------------------------------------------------------------
    def set_inputs(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
        """Copy a run's prompts (token ids, one list per row) and seeds into the buffers,
        left-padded (an empty prompt is the start token, outside the denoiser's context),
        and zero the generated count."""
        st, cap, batch = self.state, self.prompt_cap, self.batch_size
        if len(prompts) != batch or len(seeds) != batch:
            raise ConfigError(f"this plan runs {batch} rows, got {len(prompts)} prompts")
        start = self._start_token()
        host = torch.zeros(batch, st.capacity, dtype=torch.int64)
        lengths, pads = [], []
        for b, ids in enumerate(prompts):
            prefix = list(ids) if ids else [start]
            if len(prefix) > cap:
                raise ConfigError(
                    f"prompt {b} is {len(prefix)} tokens; this plan holds prompts of up to "
                    f"{cap} (plan with prompt_tokens >= {len(prefix)})"
                )
            host[b, cap - len(prefix) : cap] = torch.tensor(prefix, dtype=torch.int64)
            lengths.append(len(ids))
            pads.append(cap - len(prefix))
        st.tokens.copy_(host)
        st.prompt_len.copy_(torch.tensor(lengths, dtype=torch.int64))
        st.pad.copy_(torch.tensor(pads, dtype=torch.int64))
        st.seeds.copy_(torch.tensor(list(seeds), dtype=torch.int64))
        st.generated.zero_()

    def _start_token(self) -> int:
        tok = self.sampler.space.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return int(start if start is not None else 0)

    # ---- the loop -----------------------------------------------------------------------
    def generate(self, new_tokens: int) -> int:
        """The block loop on the buffers (after :meth:`set_inputs`): the LM prefill, then
        ``ceil(new_tokens / K)`` blocks of diffusion and decode (the last block's decode
        stops at ``new_tokens``). Graph-safe but for the prefill. Returns the blocks run."""
        if self.decode_plan is not None:
            self.decode_plan.start()
        blocks = math.ceil(new_tokens / self.block)
        for j in range(blocks):
            if self._graph is not None:
                self._graph.replay()
            elif self.diffusion is not None:
                self.diffusion.denoise()
            if self.decode_plan is None:
                continue
            if self.sampler.config.decode == "nearest":  # the states of the block written
                if j < blocks - 1:
                    self.decode_plan.absorb(self.block)
            else:
                self.decode_plan.decode_tokens(min(self.block, new_tokens - j * self.block))
        return blocks

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm the block diffusion and the decode step up on a side stream, then capture
        each as one CUDA graph (a capture that fails leaves that part eager, with a
        warning)."""
        dummy = [[]] * self.batch_size
        seeds = list(range(self.batch_size))

        def warmup() -> None:
            for _ in range(_WARMUP_RUNS):
                self.set_inputs(dummy, seeds)
                self.generate(self.block)

        if self.diffusion is not None:
            self.set_inputs(dummy, seeds)
            graph = capture_graph(
                self.device, warmup, self.diffusion.denoise, "the block diffusion"
            )
            if graph is not None:
                self._graph = graph
                log.info(
                    "captured the %d-row block diffusion for B=%d, W=%d as a CUDA graph",
                    self.steps,
                    self.batch_size,
                    self.sampler.window,
                )
        if self.decode_plan is not None and self.decode_plan.wants_graph:
            self.set_inputs(dummy, seeds)
            self.decode_plan.start()
            self.decode_plan.capture(warmup)

    @torch.no_grad()
    def run(
        self,
        prompts: Prompt | Sequence[Prompt] = None,
        *,
        seed: int | Sequence[int] = 0,
        new_tokens: int | None = None,
        chat: bool = False,
    ) -> SampleOutput:
        """Sample every row: ``new_tokens`` (default: the plan's maximum) after its prompt.

        Args:
            prompts: one prompt for every row (text, token ids or None), or a list of one
                per row (:data:`fastdia.prompts.Prompt`).
            seed: one seed (row ``b`` takes ``seed + b``) or one per row.
            new_tokens: tokens to generate, at most the plan's ``blocks x K``.
            chat: wrap text prompts in the tokenizer's chat template.
        """
        sampler = self.sampler
        new_tokens = self.max_new if new_tokens is None else new_tokens
        check_new_tokens(new_tokens, None)
        if new_tokens > self.max_new:
            raise ConfigError(
                f"this plan generates up to {self.max_new} tokens, got new_tokens={new_tokens}"
            )
        rows = sampler._prompt_rows(prompts, self.batch_size, chat)
        seeds = row_seed_list(seed, self.batch_size)
        context = sampler.context_length()
        if context is not None:
            check_new_tokens(
                math.ceil(new_tokens / self.block) * self.block, context, max(map(len, rows))
            )
        self.set_inputs(rows, seeds)
        start = time.perf_counter()
        blocks = self.generate(new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        cap = self.prompt_cap
        tokens = self.state.tokens[:, cap : cap + new_tokens].to("cpu", copy=True)
        out = self._outputs(rows, seeds, tokens, chat)
        log.info(
            "sampled %d rows x %d new tokens in %.3f s (%d blocks of %d rows%s)",
            self.batch_size,
            new_tokens,
            seconds,
            blocks,
            self.steps,
            ", CUDA graphs" if self._graph is not None else "",
        )
        out.seconds, out.blocks = seconds, blocks
        return out

    def _outputs(
        self, rows: list[list[int]], seeds: list[int], tokens: torch.Tensor, chat: bool
    ) -> SampleOutput:
        """Cut every row at its first end token and decode (host side, after timing)."""
        sampler = self.sampler
        space, stop = sampler.space, set(sampler.special.stop)
        completion, finished = [], []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            completion.append(row if end is None else row[:end])
            finished.append(end is not None)
        read = completion if chat else [p + c for p, c in zip(rows, completion, strict=True)]
        values = {
            c.name: self._final_values(c.module, tokens.shape[1])
            if c.module.config.reads_states
            else critic_values(space, c.module, read)
            for c in sampler.critics
        }
        return SampleOutput(
            prompt_ids=rows,
            completion_ids=completion,
            completions=[space.decode(c) for c in completion],
            texts=[space.decode(r) for r in read],
            finished=finished,
            seeds=seeds,
            tokens=tokens,
            critic_values=values,
            z=None if self.diffusion is None else self.diffusion.z.clone(),
            seconds=0.0,
            steps=self.steps,
            blocks=0,
            paths=self.paths,
        )

    @torch.no_grad()
    def _final_values(self, critic: nn.Module, new_tokens: int) -> torch.Tensor:
        """A value critic's value at noise level 0 of each row's last block of its
        ``new_tokens`` generated tokens (end tokens included), given the base model's
        states before that block: ``[B]`` float32 on the CPU."""
        st, cfg = self.state, critic.config
        k = min(self.block, cfg.max_length, new_tokens)
        end = self.prompt_cap + new_tokens - k  # where the last block starts
        pos = torch.arange(end - cfg.prefix_states, end, device=st.tokens.device)
        valid = pos[None, :] >= st.pad[:, None]
        states = st.hist.index_select(1, pos.clamp(min=0)) * valid[..., None]
        z0 = self.sampler.space.embed(st.tokens[:, end : end + k])
        return critic(z0, 0.0, states=states, states_mask=valid).float().cpu()


@torch.no_grad()
def critic_values(space: EmbeddingSpace, critic: nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """A critic's value at noise level 0 of each row of token ids: ``[B]`` float32 on the
    CPU (NaN for an empty row; a context critic reads its last ``max_length`` tokens)."""
    limit = getattr(getattr(critic, "config", None), "max_length", None)
    if isinstance(critic, TokenLocalCritic):
        limit = None
    out = torch.full((len(rows),), float("nan"))
    for b, ids in enumerate(rows):
        if ids:
            ids = ids[-limit:] if limit else ids
            z0 = space.embed(torch.tensor(ids, dtype=torch.int64))[None]
            out[b] = critic(z0, 0.0).float().reshape(-1)[0].cpu()
    return out


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
