"""The guided reverse-diffusion sampler (DESIGN §1-2), plan separated from run.

``Sampler.plan(B, L)`` builds everything static for a batch shape: the coefficient
table on the device, the merged token-local critic stack, the rounding bias and the
buffers. ``SamplerPlan.run(prompts, seed)`` only fills inputs and walks the table. The
loop is::

    z_T = zeta(seed, step 0)                       (prompt positions: inpainted)
    for row r:  eps = denoiser(z, t_r)             (x0-prediction converted to eps)
                [clamp: x0 <- c E[round(x0)], eps from the clamped x0]
                z = guided_step(z, eps, coef_r, ..., seed, step r + 1)
                prompt positions <- sqrt(abar') c E[prompt] + sqrt(1 - abar') zeta
    ids = round_to_vocab(z, E, bias)

Noise is counter-based (:mod:`fastdia.noise`), so a seed gives the same text on every
backend, up to float rounding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdia import noise, ops
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
    coefficient_table,
)

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        check_choice(self.sampler, SAMPLERS, "sampler")
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
        z: ``[B, L, d]`` float32 final continuous state (on the device).
        seconds: wall time of the run (denoising loop and rounding).
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
    """

    def __init__(
        self,
        denoiser: Denoiser,
        space: EmbeddingSpace,
        critics: Sequence[WeightedCritic] = (),
        config: SamplerConfig | None = None,
        device: torch.device | str | None = None,
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

    def plan(self, batch_size: int, length: int) -> SamplerPlan:
        """Allocate everything static for ``batch_size`` sequences of ``length`` tokens."""
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
    """The static state of one ``(B, L)`` shape; :meth:`run` samples with it."""

    def __init__(self, sampler: Sampler, batch_size: int, length: int) -> None:
        cfg = sampler.config
        self.sampler, self.batch_size, self.length = sampler, batch_size, length
        device = sampler.device
        space = sampler.space
        self.table: StepTable = coefficient_table(
            sampler.denoiser.config.schedule,
            cfg.sampler,
            cfg.steps,
            corrector_steps=cfg.corrector_steps,
            corrector_snr=cfg.corrector_snr,
            eta_scale=cfg.eta_scale,
        ).to(device)
        self._t = self.table.t.tolist()
        self._clamp = self._clamp_rows(cfg.clamp_from)
        local = [
            (c.module, c.weight) for c in sampler.critics if isinstance(c.module, TokenLocalCritic)
        ]
        self.stack = ops.TokenLocalStack.merge(local, self.table.t) if local else None
        self.context = [c for c in sampler.critics if not isinstance(c.module, TokenLocalCritic)]
        self.bias = space.rounding_bias(cfg.rounding)
        self.guidance = torch.tensor(float(cfg.guidance), device=device)
        self.prompt_len = 0
        self.prompt_z0 = torch.zeros(length, space.dim, device=device)
        self.prompt_ids = torch.zeros(length, dtype=torch.int64, device=device)
        self._guided_step = registry.get(ops.GUIDED_STEP, sampler.backends[ops.GUIDED_STEP])
        self._round = registry.get(ops.ROUND_TO_VOCAB, sampler.backends[ops.ROUND_TO_VOCAB])

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
        if len(ids) >= self.length:
            raise ConfigError(
                f"prompt is {len(ids)} tokens but --length is {self.length}: the length counts "
                f"the prompt, so pass --length > {len(ids)} or a shorter prompt"
            )
        p = self.prompt_len = len(ids)
        if p:
            tensor = torch.tensor(ids, dtype=torch.int64, device=self.prompt_ids.device)
            self.prompt_ids[:p] = tensor
            self.prompt_z0[:p] = space.embed(tensor)
        # flat element indices of the prompt positions of z [B, L, d]: [B, p, d]
        dim = space.dim
        starts = torch.arange(self.batch_size, device=self.prompt_ids.device) * self.length * dim
        self._prompt_index = starts[:, None, None] + torch.arange(p * dim).view(1, p, dim)
        return p

    # ---- the loop -----------------------------------------------------------------------
    def _inpaint(
        self, z: torch.Tensor, seed: int, step: int, sab: torch.Tensor, s1m: torch.Tensor
    ) -> None:
        """Write the prompt, noised to level ``sab``, into ``z``'s first positions in place.

        The noise is the step's own: element ``k`` of ``z`` takes ``zeta(seed, step, k)``,
        which the step drew for positions it has just overwritten.
        """
        p = self.prompt_len
        zeta = noise.randn_at(seed, step, self._prompt_index)
        z[:, :p] = sab * self.prompt_z0[:p] + s1m * zeta

    def _eps(self, z: torch.Tensor, r: int) -> torch.Tensor:
        den = self.sampler.denoiser
        rows = self.table.rows[r]
        sab, s1m = rows[SQRT_ABAR], rows[SQRT_1M_ABAR]
        out = den(z, self._t[r])
        if not den.config.predicts_x0 and not self._clamp[r]:
            return out
        x0 = out if den.config.predicts_x0 else (z - s1m * out) / sab
        if self._clamp[r]:
            space = self.sampler.space
            _, emb = self._round(x0, space.weight, self.bias, return_embeddings=True)
            x0 = emb * space.scale
        return (z - sab * x0) / s1m

    def _context_grad(self, z: torch.Tensor, r: int) -> torch.Tensor | None:
        if not self.context or not float(self.sampler.config.guidance):
            return None
        total = torch.zeros_like(z)
        for critic in self.context:
            _, grad = critic.module.value_and_grad(z, self._t[r])
            total += critic.weight * grad
        return total.view(-1, z.shape[-1])

    @torch.no_grad()
    def run(self, prompt: str | Sequence[int] | None = None, *, seed: int = 0) -> SampleOutput:
        """Sample ``B`` sequences of ``L`` tokens under ``seed``."""
        check_seed(seed)
        sampler, cfg = self.sampler, self.sampler.config
        self.set_prompt(prompt)
        batch, length, dim = self.batch_size, self.length, sampler.space.dim
        start = time.perf_counter()
        z = noise.randn(seed, 0, batch * length * dim, device=sampler.device).view(
            batch, length, dim
        )
        if self.prompt_len:
            rows0 = self.table.rows[0]
            self._inpaint(z, seed, 0, rows0[SQRT_ABAR], rows0[SQRT_1M_ABAR])
        for r in range(len(self.table)):
            eps = self._eps(z, r)
            flat, _ = self._guided_step(
                z.view(-1, dim),
                eps.reshape(-1, dim),
                self.table.coef[r],
                seq_len=length,
                seed=seed,
                step=r + 1,
                guidance=self.guidance,
                critic=self.stack.row(r) if self.stack is not None else None,
                grad=self._context_grad(z, r),
                noise_kappa=cfg.noise_kappa,
            )
            z = flat.view(batch, length, dim)
            if self.prompt_len:
                rows = self.table.rows[r]
                self._inpaint(z, seed, r + 1, rows[SQRT_ABAR_NEXT], rows[SQRT_1M_ABAR_NEXT])
        ids = self._round(z, sampler.space.weight, self.bias)
        ids[:, : self.prompt_len] = self.prompt_ids[: self.prompt_len]
        seconds = time.perf_counter() - start
        ids_cpu = ids.cpu()
        z0 = sampler.space.embed(ids)
        values = {c.name: c.module(z0, 0.0).float().cpu() for c in sampler.critics}
        log.info(
            "sampled %d x %d tokens in %.3f s (%d rows)", batch, length, seconds, len(self.table)
        )
        return SampleOutput(
            token_ids=ids_cpu,
            texts=sampler.space.decode_batch(ids_cpu),
            critic_values=values,
            z=z,
            seconds=seconds,
            steps=len(self.table),
        )
