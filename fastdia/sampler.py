"""The guided reverse-diffusion sampler (DESIGN §1-2), plan separated from run.

``Sampler.plan(B, L)`` builds everything static for a batch shape: the coefficient
table on the device (on the denoiser's measured time warp, down to the stop level
``t*``), the time embeddings of every row, the merged token-local critic stack, the
rounding bias and the buffers (seed, noise steps, guidance, and the prompt in a
fixed-length buffer with a mask). ``SamplerPlan.run(prompts, seed)`` copies its inputs
into those buffers and runs the fixed-length loop (on CUDA, replays it as one captured
CUDA graph: ``SamplerConfig.cuda_graph``). The loop is::

    z_T = zeta(seed, step 0)                       (drawn by the guided-step kernel)
    for row r:  x0 = denoiser(z, t_r, x0_prev, mask)   (x0_prev: self-conditioning)
                [clamp: x0 <- c E[round(x0)]]
                z = guided_step(z, eps or x0, coef_r, ..., seed, step r + 1)
                prompt positions <- c E[prompt]            (clean_prompt denoisers)
                             or <- sqrt(abar') c E[prompt] + sqrt(1 - abar') zeta
    ids = round_to_vocab(z, E, bias)               (decode "nearest", t* = 0)
        | round_to_vocab(x0, E, bias)              (decode "nearest", t* > 0)
        | LM decode of z at level t*               (decode "lm": fastdia.decode)

An eps-denoiser's row reads its output ``eps``; a row that has an x0 estimate instead
(x0 or tokens denoisers, clamped rows) feeds it to the step with the conversion
``eps = (z - sqrt(abar) x0) / sqrt(1 - abar)`` folded into the row's coefficients at plan
time. Prompt inpainting is a masked ``where`` after the step over all ``L`` positions
(not folded into the kernel); an eager plan draws a re-noised prompt's noise at the
prompt's positions only (:meth:`SamplerPlan._write_prompt`).

Noise is counter-based (:mod:`fastdia.noise`), so a seed gives the same text on every
backend, up to float rounding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastdia import noise, ops
from fastdia.base_model import BaseModel
from fastdia.decode import DECODES, DecodeConfig, LMDecoder, check_positive
from fastdia.device import capture_graph
from fastdia.embedding import ROUNDINGS, EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.critic import TokenLocalCritic
from fastdia.models.denoiser import Denoiser
from fastdia.ops import registry
from fastdia.schedules import (
    SAMPLERS,
    SQRT_1M_ABAR,
    SQRT_1M_ABAR_NEXT,
    SQRT_ABAR,
    SQRT_ABAR_NEXT,
    StepTable,
    check_choice,
    check_stop,
    coefficient_table,
    step_times,
)

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2  # eager runs on a side stream before a CUDA graph capture


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
        cuda_graph: on a CUDA device, capture each plan's fixed-length loop (denoiser
            included) as one CUDA graph and replay it on every run; no effect elsewhere.
    """

    sampler: str = "dia"
    steps: int = 50
    guidance: float = 0.0
    rounding: str = "l2"
    clamp_from: int | None = None
    corrector_steps: int = 0
    corrector_snr: float = 0.1
    eta_scale: float = 1.0
    noise_kappa: float = 0.0
    backend: str | None = None
    time_warp: bool = True
    score_temperature: float = 1.0
    stop_at: float = 0.0
    decode: str = "nearest"
    lm: DecodeConfig = field(default_factory=DecodeConfig)
    self_condition: bool = True
    clean_prompt: bool = True
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        check_choice(self.sampler, SAMPLERS, "sampler")
        check_choice(self.decode, DECODES, "decode")
        check_stop(self.stop_at)
        check_positive(self.score_temperature, "score_temperature")
        if self.decode == "lm" and self.lm.latent_weight and self.stop_at == 0:
            raise ConfigError(
                "--decode lm reads the latent at a noise level: give a stop level t* in "
                "(0, 1) with --stop-at (or --latent-weight 0 to decode without the latent)"
            )
        check_choice(self.rounding, ROUNDINGS, "rounding")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise ConfigError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.guidance < 0:
            raise ConfigError(
                f"guidance must be >= 0, got {self.guidance}; to steer away from a reward, "
                "give it a negative weight in the reward spec instead"
            )
        if self.clamp_from is not None and not 1 <= self.clamp_from <= self.steps:
            raise ConfigError(
                f"clamp_from must be in [1, steps={self.steps}], got {self.clamp_from}"
            )
        if not math.isfinite(self.noise_kappa) or self.noise_kappa < 0:
            raise ConfigError(f"noise_kappa must be a finite number >= 0, got {self.noise_kappa}")


@dataclass
class WeightedCritic:
    """A critic with its name (the reward spec it imitates) and its weight."""

    name: str
    module: nn.Module
    weight: float = 1.0


@dataclass
class SampleOutput:
    """What a run produced.

    Attributes:
        token_ids: ``[B, L]`` int64 on the CPU (prompt ids included).
        texts: the decoded ``B`` texts.
        critic_values: critic name -> ``[B]`` float32, each critic on the final tokens.
        z: ``[B, L, d]`` float32 final continuous state (on the device), at level
            ``t*`` when the run stops early.
        seconds: wall time of the run (denoising loop and decode, device work finished).
        steps: table rows run (predictor and corrector).
    """

    token_ids: torch.Tensor
    texts: list[str]
    critic_values: dict[str, torch.Tensor]
    z: torch.Tensor
    seconds: float
    steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.token_ids.numel() / self.seconds if self.seconds > 0 else float("inf")


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in ``[0, 2**31)``; else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return seed


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
        self.config = config or SamplerConfig()
        self.device = torch.device(device) if device else next(denoiser.parameters()).device
        if denoiser.config.dim != space.dim:
            raise ConfigError(
                f"denoiser width {denoiser.config.dim} != embedding width {space.dim}: "
                "the denoiser belongs to another base model"
            )
        self.denoiser = denoiser.to(self.device).eval()
        self.space = space.to(self.device)
        self.critics = [
            WeightedCritic(c.name, c.module.to(self.device).eval(), c.weight) for c in critics
        ]
        self.backends = {
            op: registry.resolve_backend(self.config.backend, op, self.device)
            for op in ops.SAMPLER_OPS
        }
        self._plans: dict[tuple[int, int], SamplerPlan] = {}
        self.decoder: LMDecoder | None = None
        if self.config.decode == "lm":
            if base_model is None:
                raise ConfigError(
                    'decode="lm" samples with the base model: pass base_model= to Sampler '
                    "(fastdia.pipeline.build_sampler does)"
                )
            space.check_fingerprint(base_model.space.fingerprint, "the LM decode's base model")
            self.decoder = LMDecoder(base_model, self.config.lm, self.backends)

    def plan(self, batch_size: int, length: int) -> SamplerPlan:
        """Allocate everything static for ``batch_size`` sequences of ``length`` tokens.

        Plans are cached by shape: asking again for the same ``(B, L)`` returns the same
        plan (its buffers are reused by every run). On a CUDA device with
        ``config.cuda_graph`` the first call also warms the loop up and captures it as a
        CUDA graph (:class:`SamplerPlan`).
        """
        key = (batch_size, length)
        if key not in self._plans:
            self._plans[key] = self._new_plan(batch_size, length)
        return self._plans[key]

    def _new_plan(self, batch_size: int, length: int) -> SamplerPlan:
        if batch_size < 1 or length < 1:
            raise ConfigError(
                f"need at least one sample of one token, got B={batch_size}, L={length}"
            )
        if length > self.denoiser.config.max_length:
            raise ConfigError(
                f"length {length} exceeds the denoiser's maximum of "
                f"{self.denoiser.config.max_length} tokens; use --length <= "
                f"{self.denoiser.config.max_length} or a denoiser trained for longer sequences"
            )
        return SamplerPlan(self, batch_size, length)

    def sample(
        self,
        num_samples: int,
        length: int,
        *,
        prompt: str | Sequence[int] | None = None,
        seed: int = 0,
    ) -> SampleOutput:
        """Plan and run once. ``prompt`` is text, token ids, or None."""
        return self.plan(num_samples, length).run(prompt, seed=seed)


class SamplerPlan:
    """The static state of one ``(B, L)`` shape; :meth:`run` samples with it.

    Everything a step needs is built here, on the sampler's device: the coefficient
    table (with the x0-to-eps conversion folded into the rows that take an x0 estimate),
    each row's time embedding, the critic stack's per-row hidden biases, the rounding
    bias, and the static buffers every run reuses: the seed ``[]`` int64 and the noise
    steps ``[R + 1]`` int64, the guidance ``[]`` float32, the prompt ``[L]`` int64 with its
    mask ``[L]`` bool and embeddings ``[L, d]`` float32 (one plan serves every prompt
    shorter than ``L``), the two state buffers ``[B, L, d]`` float32 the steps alternate
    between, the x0 estimate ``[B, L, d]`` and the token ids ``[B, L]`` int64.

    :meth:`denoise` is the fixed-length loop; it is graph-safe (DESIGN §2): it reads its
    inputs from those buffers, creates no tensor from host values, reads nothing back to
    the host and branches on static configuration only (``fastdia.strict`` checks this on
    CPU). On a CUDA device with ``SamplerConfig.cuda_graph`` the plan warms the loop up on
    a side stream (Triton autotuning, extension builds, library handles) and captures it,
    denoiser included, as one CUDA graph; :meth:`run` then copies its inputs into the
    buffers and replays it. The LM decode (``decode="lm"``) follows with its own plan
    (:class:`fastdia.decode.DecodePlan`): a static KV cache and a per-token step, captured
    as a second graph and replayed once per position.
    """

    def __init__(self, sampler: Sampler, batch_size: int, length: int) -> None:
        cfg = sampler.config
        self.sampler, self.batch_size, self.length = sampler, batch_size, length
        self.device = device = sampler.device
        space = sampler.space
        den = sampler.denoiser
        dim = space.dim
        warp = den.config.time_grid if cfg.time_warp else None
        self.times = step_times(cfg.steps, warp, cfg.stop_at)
        table = coefficient_table(
            den.config.schedule,
            cfg.sampler,
            cfg.steps,
            corrector_steps=cfg.corrector_steps,
            corrector_snr=cfg.corrector_snr,
            eta_scale=cfg.eta_scale,
            times=self.times,
        )
        # a host copy of the per-row constants (static scalars of the loop's arithmetic)
        self._rows: list[list[float]] = table.rows.tolist()
        self.table: StepTable = table.to(device)
        rows = len(table)
        with torch.no_grad():
            temb = den.time_embedding(self.table.t, rows, device)
        self._temb = temb[:, None, :].expand(-1, batch_size, -1)  # [R, B, h], no copy
        self._clamp = self._clamp_rows(cfg.clamp_from)
        # rows fed the x0 estimate instead of eps: eps = (z - sab x0) / s1m is folded into
        # their coefficients, a' = a + b / s1m and b' = -b sab / s1m (in float64, then fp32)
        self._takes_x0 = [den.config.predicts_x0 or clamp for clamp in self._clamp]
        coef = table.coef.double()
        for r, takes_x0 in enumerate(self._takes_x0):
            if takes_x0:
                a, b = coef[r, 0].item(), coef[r, 1].item()
                sab, s1m = self._rows[r][SQRT_ABAR], self._rows[r][SQRT_1M_ABAR]
                coef[r, 0], coef[r, 1] = a + b / s1m, -b * sab / s1m
        self.coef = coef.float().to(device)  # [R, 4] float32
        local = [
            (c.module, c.weight) for c in sampler.critics if isinstance(c.module, TokenLocalCritic)
        ]
        self.stack = ops.TokenLocalStack.merge(local, self.table.t) if local else None
        self.context = [c for c in sampler.critics if not isinstance(c.module, TokenLocalCritic)]
        self.bias = space.rounding_bias(cfg.rounding)
        self.guidance = torch.tensor(float(cfg.guidance), device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self._steps = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self.prompt_len = 0
        self.prompt_z0 = torch.zeros(length, dim, device=device)
        self.prompt_ids = torch.zeros(length, dtype=torch.int64, device=device)
        self.prompt_mask = torch.zeros(length, dtype=torch.bool, device=device)
        self._batch_mask = self.prompt_mask[None, :].expand(batch_size, -1)
        self._mask3 = self.prompt_mask[:, None]  # [L, 1], broadcast against [B, L, d]
        self._self_cond = den.config.self_condition and cfg.self_condition
        self._clean = den.config.clean_prompt and cfg.clean_prompt
        self._need_x0 = self._self_cond or cfg.stop_at > 0
        # the initial noise and the re-noised prompt are guided steps with (a, b, c, s) =
        # (0, 0, 0, 1) on zeros: exactly zeta(seed, step), drawn by the backend's kernel
        # from the seed in device memory
        self._noise_coef = torch.tensor([0.0, 0.0, 0.0, 1.0], device=device)
        self._zeros = torch.zeros(batch_size * length, dim, device=device)
        self._zeta = None if self._clean else torch.empty(batch_size, length, dim, device=device)
        # flat element index of z [B, L, d]: the noise counters of an eager plan's re-noised
        # prompt (denoisers without clean_prompt), drawn at the prompt's positions only
        self._index = (
            None
            if self._clean
            else torch.arange(batch_size * length * dim, device=device).view(
                batch_size, length, dim
            )
        )
        self._bufs = tuple(torch.zeros(batch_size, length, dim, device=device) for _ in range(2))
        self.x0 = torch.zeros(batch_size, length, dim, device=device)
        self.ids = torch.zeros(batch_size, length, dtype=torch.int64, device=device)
        self._guided_step = registry.get(ops.GUIDED_STEP, sampler.backends[ops.GUIDED_STEP])
        self._round = registry.get(ops.ROUND_TO_VOCAB, sampler.backends[ops.ROUND_TO_VOCAB])
        self._graph: torch.cuda.CUDAGraph | None = None
        self.fixed_length = cfg.cuda_graph and device.type == "cuda"
        self.decode_plan = (
            sampler.decoder.plan(
                batch_size,
                length,
                self._abar_stop(),
                local,
                cfg.lm.tilt * cfg.guidance / length,
                graph=self.fixed_length,
            )
            if sampler.decoder is not None
            else None
        )
        if self.fixed_length:
            self._capture()

    @property
    def z(self) -> torch.Tensor:
        """The state buffer the last row writes: ``[B, L, d]`` float32."""
        return self._bufs[len(self.table) % 2]

    fixed_length: bool
    """Whether the loop selects prompt positions by the mask alone (True when it is
    captured as a CUDA graph; tests set it to check that variant on the CPU)."""

    @property
    def graphed(self) -> bool:
        """Whether :meth:`run` replays a captured CUDA graph."""
        return self._graph is not None

    def _abar_stop(self) -> float:
        return self._rows[-1][SQRT_ABAR_NEXT] ** 2

    def _clamp_rows(self, clamp_from: int | None) -> list[bool]:
        if clamp_from is None:
            return [False] * len(self.table)
        flags, predictor_index = [], 0
        for is_predictor in self.table.predictor:
            predictor_index += is_predictor
            flags.append(predictor_index >= clamp_from)
        return flags

    # ---- inputs -------------------------------------------------------------------------
    def set_prompt(self, prompt: str | Sequence[int] | None) -> int:
        """Write the prompt into the static buffers; returns its length in tokens."""
        space = self.sampler.space
        ids = prompt_ids(space, prompt, self.length)
        p = self.prompt_len = len(ids)
        host = torch.zeros(self.length, dtype=torch.int64)
        host[:p] = torch.tensor(ids, dtype=torch.int64)
        self.prompt_ids.copy_(host)
        self.prompt_mask.copy_(torch.arange(self.length) < p)
        self.prompt_z0.copy_(space.embed(self.prompt_ids).masked_fill_(~self._mask3, 0.0))
        return p

    def set_inputs(self, prompt: str | Sequence[int] | None, seed: int) -> int:
        """Copy a run's inputs (prompt, seed) into the static buffers; returns the prompt
        length in tokens."""
        self.seed.fill_(check_seed(seed))
        return self.set_prompt(prompt)

    # ---- the loop -----------------------------------------------------------------------
    def _noise(self, step: int, out: torch.Tensor) -> torch.Tensor:
        """``zeta(seed, steps[step], k)`` into ``out`` ``[B, L, d]`` (see ``_noise_coef``)."""
        dim = self.sampler.space.dim
        self._guided_step(
            self._zeros,
            self._zeros,
            self._noise_coef,
            seq_len=self.length,
            seed=self.seed,
            step=self._steps[step],
            guidance=self.guidance,
            out=out.view(-1, dim),
        )
        return out

    def _write_prompt(self, z: torch.Tensor, step: int, sab: float, s1m: float) -> None:
        """Write the prompt into ``z``'s masked positions in place (all ``L`` positions are
        touched: the mask, not a host length, selects them).

        A ``clean_prompt`` denoiser sees it clean; others see it noised to level ``sab``
        with the step's own noise (element ``k`` takes ``zeta(seed, step, k)``, which
        the step drew for the positions it overwrites; at step 0 that is ``z`` itself).
        That noise is drawn over all ``L`` positions by the backend's kernel when
        :attr:`fixed_length` (a captured plan: the prompt length is not static), else
        with the reference Philox at the prompt's ``p`` positions only (an eager plan
        knows ``p`` on the host: on the CPU this saves a full draw per step).
        """
        if self._clean:
            torch.where(self._mask3, self.prompt_z0, z, out=z)
            return
        if step == 0 or self.fixed_length:
            zeta = z if step == 0 else self._noise(step, self._zeta)
            torch.where(self._mask3, sab * self.prompt_z0 + s1m * zeta, z, out=z)
            return
        p = self.prompt_len
        if p:
            zeta = noise.randn_at(self.seed, self._steps[step], self._index[:, :p])
            z[:, :p] = sab * self.prompt_z0[:p] + s1m * zeta

    def _denoise_row(self, z: torch.Tensor, r: int) -> torch.Tensor:
        """What row ``r``'s guided step reads: the noise estimate ``[B, L, d]``, or the x0
        estimate on rows whose coefficients take it (``_takes_x0``).

        Keeps the x0 estimate (self-conditioned, possibly clamped) in ``self.x0`` when the
        next row's self-conditioning or an early stop's rounding reads it.
        """
        den, cfg = self.sampler.denoiser, self.sampler.config
        sab, s1m = self._rows[r][SQRT_ABAR], self._rows[r][SQRT_1M_ABAR]
        out = den(
            z,
            self.table.t[r],
            x0_prev=self.x0 if self._self_cond else None,
            clean_mask=self._batch_mask if self._clean else None,
            temb=self._temb[r],
            temperature=cfg.score_temperature,
        )
        if not self._takes_x0[r]:
            if self._need_x0:
                self.x0.copy_((z - s1m * out) / sab)
            return out
        x0 = out if den.config.predicts_x0 else (z - s1m * out) / sab
        if self._clamp[r]:
            space = self.sampler.space
            _, emb = self._round(x0, space.weight, self.bias, return_embeddings=True)
            x0 = emb * space.scale
        if self._need_x0:
            self.x0.copy_(x0)
        return x0

    def _context_grad(self, z: torch.Tensor, r: int) -> torch.Tensor | None:
        if not self.context or not self.sampler.config.guidance:
            return None
        total = torch.zeros_like(z)
        for critic in self.context:
            _, grad = critic.module.value_and_grad(z, self.table.t[r])
            total += critic.weight * grad
        return total.view(-1, z.shape[-1])

    @torch.no_grad()
    def denoise(self) -> None:
        """The fixed-length loop on the static buffers (what the CUDA graph captures).

        Reads the seed, prompt, mask and guidance from their buffers; leaves the final
        state in :attr:`z`, the x0 estimate in ``x0`` and, with the nearest decode, the
        token ids ``[B, L]`` int64 (prompt included) in ``ids``.
        """
        cfg, space = self.sampler.config, self.sampler.space
        dim = space.dim
        z = self._noise(0, self._bufs[0])
        if self._need_x0:
            self.x0.zero_()
        self._write_prompt(z, 0, self._rows[0][SQRT_ABAR], self._rows[0][SQRT_1M_ABAR])
        for r in range(len(self.table)):
            inp = self._denoise_row(z, r)
            nxt = self._bufs[(r + 1) % 2]
            self._guided_step(
                z.view(-1, dim),
                inp.reshape(-1, dim),
                self.coef[r],
                seq_len=self.length,
                seed=self.seed,
                step=self._steps[r + 1],
                guidance=self.guidance,
                critic=self.stack.row(r) if self.stack is not None else None,
                grad=self._context_grad(z, r),
                noise_kappa=cfg.noise_kappa,
                out=nxt.view(-1, dim),
            )
            z = nxt
            row = self._rows[r]
            self._write_prompt(z, r + 1, row[SQRT_ABAR_NEXT], row[SQRT_1M_ABAR_NEXT])
        if self.decode_plan is None:
            final = z if cfg.stop_at == 0 else self.x0
            ids = self._round(final, space.weight, self.bias)
            torch.where(self.prompt_mask, self.prompt_ids, ids, out=self.ids)

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm :meth:`denoise` up on a side stream, then capture it as one CUDA graph.

        A capture that fails (an op that cannot be captured) leaves the plan eager, with
        a warning.
        """
        self.set_inputs(None, 0)

        def warmup() -> None:
            for _ in range(_WARMUP_RUNS):
                self.denoise()

        graph = capture_graph(self.device, warmup, self.denoise, "the diffusion loop")
        if graph is None:
            return
        self._graph = graph
        log.info(
            "captured the %d-row loop for B=%d, L=%d as a CUDA graph",
            len(self.table),
            self.batch_size,
            self.length,
        )

    @torch.no_grad()
    def run(self, prompt: str | Sequence[int] | None = None, *, seed: int = 0) -> SampleOutput:
        """Sample ``B`` sequences of ``L`` tokens under ``seed``."""
        sampler = self.sampler
        p = self.set_inputs(prompt, seed)
        batch, length = self.batch_size, self.length
        start = time.perf_counter()
        if self._graph is not None:
            self._graph.replay()
        else:
            self.denoise()
        ids = self.ids
        if self.decode_plan is not None:
            ids = self.decode_plan.run(self.z, self.prompt_ids[:p], seed=seed)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = time.perf_counter() - start
        ids_cpu = ids.to("cpu", copy=True)  # the plan's buffer is reused by the next run
        z0 = sampler.space.embed(ids)
        values = {c.name: c.module(z0, 0.0).float().cpu() for c in sampler.critics}
        log.info(
            "sampled %d x %d tokens in %.3f s (%d rows%s)",
            batch,
            length,
            seconds,
            len(self.table),
            ", CUDA graph" if self._graph is not None else "",
        )
        return SampleOutput(
            token_ids=ids_cpu,
            texts=sampler.space.decode_batch(ids_cpu),
            critic_values=values,
            z=self.z.clone(),  # the plan's buffer is overwritten by the next run
            seconds=seconds,
            steps=len(self.table),
        )


def prompt_ids(space: EmbeddingSpace, prompt: str | Sequence[int] | None, length: int) -> list[int]:
    """The prompt as token ids, checked to fit in ``length`` tokens with room to continue.

    Raises:
        ConfigError: an empty prompt text, ids outside the vocabulary, or a prompt of
            ``length`` tokens or more.
    """
    if prompt is None:
        ids: list[int] = []
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("prompt is empty; pass some text, or no prompt at all")
        ids = space.encode(prompt)
    else:
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < space.vocab_size for i in ids):
            raise ConfigError(f"prompt ids must be in [0, {space.vocab_size})")
    if len(ids) >= length:
        raise ConfigError(
            f"prompt is {len(ids)} tokens but --length is {length}: the length counts "
            f"the prompt, so pass --length > {len(ids)} or a shorter prompt"
        )
    return ids
