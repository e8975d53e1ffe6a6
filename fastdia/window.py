"""One block's guided reverse diffusion over the denoiser's window (docs/design.md §1, blocks).

The block loop (:mod:`fastdia.sampler`) writes text of any length in blocks of ``K``
tokens. Before each block, every row's *window* of ``W`` positions (the denoiser's
length) is laid out as in training: the row's last ``c`` tokens (prompt and text so far)
as its clean prompt at positions ``[0, c)``, then ``W - c`` noisy positions, of which the
first ``K`` are the block::

    c_b = min(W - K, prompt_len_b + generated)       (per row: ragged prompts)
    window_b = [ tokens_b[-c_b:] (clean, masked) | block (K) | look-ahead (W - K - c_b) ]

The look-ahead positions (only while a row has fewer than ``W - K`` tokens) are diffused
with the block and dropped. The loop is::

    z_T = zeta(seed_b, step 0)                       (per row: its own seed)
    for row r:  x0 = denoiser(z, t_r, x0_prev, mask)  (x0_prev: self-conditioning)
                [clamp: x0 <- c E[round(x0)]]
                z = guided_step(z, eps or x0, coef_r, ..., seeds, step r + 1)
                context positions <- c E[context]     (clean_prompt denoisers)
                                  or <- sqrt(abar') c E[context] + sqrt(1 - abar') zeta
    latent = z[b, c_b : c_b + K]                      (read by the LM decode at level t*)
    | tokens = round(z or x0 at the block)            (decode "nearest"; written in place)

Noise steps: block ``j`` draws its rows at steps ``j (R + 1) + [0, R]``, each row under its
own seed with element ``w d + i`` of its window (:mod:`fastdia.noise`), so a row's text
does not depend on what else shares the batch. With one block of ``K = W`` and no prompt
this is the single-window sampler of earlier versions, step for step.

Everything a step needs is built once here; :meth:`WindowDiffusion.denoise` reads the
block's inputs (the token buffer, the generated count, the seeds) from device buffers,
creates no tensor from host values and reads nothing back (graph-safe, docs/design.md §2), so one
captured CUDA graph serves every block.

An eps-denoiser's row reads its output ``eps``; a row that has an x0 estimate instead
(x0 or tokens denoisers, clamped rows) feeds it to the step with the conversion
``eps = (z - sqrt(abar) x0) / sqrt(1 - abar)`` folded into the row's coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastdia import mala, noise, ops
from fastdia.errors import ConfigError
from fastdia.models.critic import TokenLocalCritic
from fastdia.models.proposal import proposal_grad
from fastdia.ops import registry
from fastdia.ops.guided_step_ref import critic_value_and_grad
from fastdia.prompts import cut_completions
from fastdia.schedules import (
    SQRT_1M_ABAR,
    SQRT_1M_ABAR_NEXT,
    SQRT_ABAR,
    SQRT_ABAR_NEXT,
    C,
    StepTable,
    coefficient_table,
    step_times,
)
from fastdia.zeroth_order import ZerothOrderGuide

if TYPE_CHECKING:
    from fastdia.models.critic import CriticConfig
    from fastdia.models.denoiser import DenoiserConfig
    from fastdia.sampler import Sampler

BANNED_SCORE = -1.0e9  # the score bias of a token that must never be chosen


@dataclass
class BlockState:
    """The device buffers a block loop's diffusion and decode share.

    A row's tokens sit left-padded in ``tokens``: its base-model prefix (the prompt, or
    the start token for an empty prompt) ends at ``prompt_cap``, its generated tokens follow.

    Attributes:
        tokens: ``[B, C]`` int64, ``C = prompt_cap + max_new``.
        prompt_len: ``[B]`` int64, the prompt tokens of each row (the denoiser's context).
        pad: ``[B]`` int64, the left padding of each row (``prompt_cap`` minus its
            base-model prefix).
        generated: ``[1]`` int64, the tokens generated so far (the same for every row).
        seeds: ``[B]`` int64, each row's noise seed.
        latent: ``[B, K, d]`` float32, the block's latent at the stop level.
        prompt_cap: ``P``, the longest base-model prefix the buffers hold.
        block: ``K``, tokens per block.
        hist: ``[B, C, h]`` float32, the base model's last-layer state of every token read
            so far (the LM decode writes them), or None when neither the denoiser nor a
            critic reads them.
    """

    tokens: torch.Tensor
    prompt_len: torch.Tensor
    pad: torch.Tensor
    generated: torch.Tensor
    seeds: torch.Tensor
    latent: torch.Tensor
    prompt_cap: int
    block: int
    hist: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        batch: int,
        prompt_cap: int,
        max_new: int,
        block: int,
        dim: int,
        device: torch.device,
        *,
        state_dim: int = 0,
    ) -> BlockState:
        """Zeroed buffers for ``batch`` rows, prompts up to ``prompt_cap`` tokens and up to
        ``max_new`` generated tokens in blocks of ``block`` (with ``state_dim``, the
        base-model states of every position too)."""
        i64 = {"dtype": torch.int64, "device": device}
        capacity = prompt_cap + max_new
        hist = torch.zeros(batch, capacity, state_dim, device=device) if state_dim else None
        return cls(
            tokens=torch.zeros(batch, capacity, **i64),
            prompt_len=torch.zeros(batch, **i64),
            pad=torch.zeros(batch, **i64),
            generated=torch.zeros(1, **i64),
            seeds=torch.zeros(batch, **i64),
            latent=torch.zeros(batch, block, dim, device=device),
            prompt_cap=prompt_cap,
            block=block,
            hist=hist,
        )

    @property
    def capacity(self) -> int:
        """``C``: the token buffer's length."""
        return self.tokens.shape[1]

    def read_so_far(
        self, prompts: list[list[int]], stop: Sequence[int], *, chat: bool
    ) -> list[list[int]]:
        """What a reward reads of each row's text so far (token ids): its prompt (one list
        per row) and the tokens generated up to the first ``stop`` id, or with ``chat`` the
        generated tokens alone (:func:`fastdia.prompts.cut_completions`; a host read)."""
        cap, generated = self.prompt_cap, int(self.generated)
        text = self.tokens[:, cap : cap + generated].tolist()
        return cut_completions(prompts, text, stop, chat=chat)[2]


class WindowDiffusion:
    """The static state of one block's diffusion (see the module docstring).

    Built once per block plan: the coefficient table (with the x0-to-eps conversion folded
    into the rows that take an x0 estimate), each row's time embedding, the critic stack's
    per-row hidden biases, the rounding bias (banned tokens excluded) and the buffers every
    block reuses: the window's context ids ``[B, W]`` int64, mask ``[B, W]`` bool and clean
    embeddings ``[B, W, d]``, the block's window positions ``[B, K]`` int64, the noise steps
    ``[R + 1]`` int64, two state buffers ``[B, W, d]`` the steps alternate between and the
    x0 estimate ``[B, W, d]``.

    Args:
        sampler: the :class:`~fastdia.sampler.Sampler` (denoiser, space, critics, config).
        state: the block loop's shared buffers.
        window: ``W``, the denoiser's window (``<=`` its ``max_length``).
        banned: token ids the nearest decode must never write.
        nearest: write the block's tokens by rounding (decode ``"nearest"``), else leave
            the block's latent in ``state.latent`` for the LM decode.
    """

    def __init__(
        self,
        sampler: Sampler,
        state: BlockState,
        window: int,
        banned: tuple[int, ...] = (),
        *,
        nearest: bool,
    ) -> None:
        cfg = sampler.config
        self.sampler, self.state, self.window, self.nearest = sampler, state, window, nearest
        self.device = device = sampler.device
        space, den = sampler.space, sampler.denoiser
        batch, block, dim = state.tokens.shape[0], state.block, space.dim
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
            mh_steps=cfg.mh_steps,
            mh_snr=cfg.mh_snr,
        )
        # a host copy of the per-row constants (static scalars of the loop's arithmetic)
        self._rows: list[list[float]] = table.rows.tolist()
        self.table: StepTable = table.to(device)
        rows = len(table)
        with torch.no_grad():
            temb = den.time_embedding(self.table.t, rows, device)
        self._temb = temb[:, None, :].expand(-1, batch, -1)  # [R, B, h], no copy
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
        local = sampler.local_critics
        self.stack = ops.TokenLocalStack.merge(local, self.table.t) if local else None
        self.context = [c for c in sampler.critics if not isinstance(c.module, TokenLocalCritic)]
        bias = space.rounding_bias(cfg.rounding)
        if banned:
            bias = torch.zeros(space.vocab_size, device=device) if bias is None else bias.clone()
            bias[list(banned)] = BANNED_SCORE
        self.bias = bias
        self.guidance = torch.tensor(float(cfg.guidance), device=device)
        self._steps = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self._step_ar = self._steps.clone()
        self._ar_w = torch.arange(window, dtype=torch.int64, device=device)
        self._ar_k = torch.arange(block, dtype=torch.int64, device=device)
        self.ctx_ids = torch.zeros(batch, window, dtype=torch.int64, device=device)
        self.mask = torch.zeros(batch, window, dtype=torch.bool, device=device)
        self.ctx_z0 = torch.zeros(batch, window, dim, device=device)
        self.block_pos = torch.zeros(batch, block, dtype=torch.int64, device=device)
        self._mask3 = self.mask[:, :, None]  # [B, W, 1], broadcast against [B, W, d]
        # what reads base-model states (the denoiser, value critics): those of the last M
        # tokens before the block, M the most any reader takes; each reads its last few
        # (the sampler checked that they read one width, the width state.hist keeps)
        readers = [den.config] + [c.module.config for c in sampler.critics]
        m = max((r.prefix_states for r in readers if r.reads_states), default=0)
        self._states: dict[str, torch.Tensor] = {}
        if m:
            width = sampler.state_dim
            self._ar_m = torch.arange(m, dtype=torch.int64, device=device)
            self._state_pos = torch.zeros(m, dtype=torch.int64, device=device)
            self._states = {
                "states": torch.zeros(batch, m, width, device=device),
                "states_mask": torch.zeros(batch, m, dtype=torch.bool, device=device),
            }
        self._state_inputs = self._states_for(den.config)
        self._critic_inputs = [self._states_for(c.module.config) for c in self.context]
        self._self_cond = den.config.self_condition and cfg.self_condition
        self._clean = den.config.clean_prompt and cfg.clean_prompt
        if den.config.lm_prior and not self._clean:
            raise ConfigError(
                "an lm_prior denoiser finds the block's first position by its clean prompt: "
                "sampling it without the clean prompt (clean_prompt=False) is not supported"
            )
        self._need_x0 = self._self_cond or cfg.stop_at > 0
        # the initial noise and the re-noised context are guided steps with (a, b, c, s) =
        # (0, 0, 0, 1) on zeros: exactly zeta(seed_b, step), drawn by the backend's kernel
        # from the seeds in device memory
        self._noise_coef = torch.tensor([0.0, 0.0, 0.0, 1.0], device=device)
        self._zeros = torch.zeros(batch * window, dim, device=device)
        self._zeta = None if self._clean else torch.empty(batch, window, dim, device=device)
        self._bufs = tuple(torch.zeros(batch, window, dim, device=device) for _ in range(2))
        self.x0 = torch.zeros(batch, window, dim, device=device)
        self._at_block = self.block_pos[:, :, None].expand(-1, -1, dim)  # a view: [B, K, d]
        self._guided_step = registry.get(ops.GUIDED_STEP, sampler.backends[ops.GUIDED_STEP])
        self._round = registry.get(ops.ROUND_TO_VOCAB, sampler.backends[ops.ROUND_TO_VOCAB])
        # zeroth-order guidance: the reward's own gradient estimate replaces the critics'
        self.zo = ZerothOrderGuide(self) if cfg.guidance_estimator == "zo" else None
        # the amortised proposal: its prediction of the critics' gradient replaces theirs,
        # heads mixed by the run's reward weights, hidden bias per row of the table
        self.proposal = None
        if sampler.proposal is not None and sampler.proposal_weights is not None:
            self.proposal = sampler.proposal.fold(sampler.proposal_weights, self.table.t)
        if self.zo is not None or self.proposal is not None:
            self.stack, self.context = None, []
        # MALA rows: accepted moves per row (device; reset per run), proposals per block,
        # each row's draw (its proposal noise and one normal for its accept test), and the
        # evaluation of the current state a MALA row hands the next one at its level
        self.mh_accepted = torch.zeros(batch, device=device)
        self.mh_rows = sum(table.adjusted)
        draw = (batch, window * dim + 1)
        self._mh_draw = torch.zeros(draw, device=device) if self.mh_rows else None
        # 1 where a MALA row moves the state (not context): [B, W, 1] float32, per block
        self._mh_free = torch.zeros(batch, window, 1, device=device) if self.mh_rows else None
        self._mh_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def z(self) -> torch.Tensor:
        """The state buffer the last row writes: ``[B, W, d]`` float32."""
        return self._bufs[len(self.table) % 2]

    @property
    def at_block(self) -> torch.Tensor:
        """The block's window positions, expanded over the width: ``[B, K, d]`` int64 (a
        view of the layout's buffer, current after each block's layout)."""
        return self._at_block

    @property
    def abar_stop(self) -> float:
        """``abar`` at the stop level ``t*`` (1 when the diffusion runs to clean data)."""
        return self._rows[-1][SQRT_ABAR_NEXT] ** 2

    def _states_for(self, config: DenoiserConfig | CriticConfig) -> dict[str, torch.Tensor]:
        """The state inputs of a reader (denoiser or critic config): views of the last
        ``prefix_states`` of the shared buffers (``{}`` for one that reads none)."""
        if not config.reads_states:
            return {}
        m = config.prefix_states
        return {k: v[:, v.shape[1] - m :] for k, v in self._states.items()}

    def _clamp_rows(self, clamp_from: int | None) -> list[bool]:
        if clamp_from is None:
            return [False] * len(self.table)
        flags, predictor_index = [], 0
        for is_predictor in self.table.predictor:
            predictor_index += is_predictor
            flags.append(predictor_index >= clamp_from)
        return flags

    # ---- the loop -----------------------------------------------------------------------
    def _layout(self) -> None:
        """The block's window: context ids, mask and clean embeddings, the block's
        positions in the window and the block's noise steps, from the shared buffers."""
        st, window, block = self.state, self.window, self.state.block
        gen = st.generated
        ctx = (st.prompt_len + gen).clamp_(max=window - block)  # [B]
        start = (gen + st.prompt_cap) - ctx  # [B], where each row's context begins
        index = (start[:, None] + self._ar_w).clamp_(0, st.capacity - 1)
        torch.gather(st.tokens, 1, index, out=self.ctx_ids)
        torch.lt(self._ar_w, ctx[:, None], out=self.mask)
        space = self.sampler.space
        torch.mul(space.embed(self.ctx_ids), self._mask3, out=self.ctx_z0)
        torch.add(self._ar_k, ctx[:, None], out=self.block_pos)
        torch.add(self._step_ar, (gen // block) * len(self._step_ar), out=self._steps)
        if self._states:  # the states of the M tokens before the block
            states, valid = self._states["states"], self._states["states_mask"]
            torch.add(self._ar_m, gen + (st.prompt_cap - len(self._ar_m)), out=self._state_pos)
            torch.ge(self._state_pos[None, :], st.pad[:, None], out=valid)
            torch.index_select(st.hist, 1, self._state_pos.clamp_(min=0), out=states)
            states.mul_(valid[:, :, None])
        if self._mh_free is not None:
            torch.logical_not(self._mask3, out=self._mh_free)

    def _noise(self, step: int, out: torch.Tensor) -> torch.Tensor:
        """``zeta(seed_b, steps[step], k)`` into ``out`` ``[B, W, d]`` (see ``_noise_coef``)."""
        dim = self.sampler.space.dim
        self._guided_step(
            self._zeros,
            self._zeros,
            self._noise_coef,
            seq_len=self.window,
            seed=self.state.seeds,
            step=self._steps[step],
            guidance=self.guidance,
            out=out.view(-1, dim),
        )
        return out

    def _write_context(self, z: torch.Tensor, step: int, sab: float, s1m: float) -> None:
        """Write the context into ``z``'s masked positions in place (the mask, not a host
        length, selects them). A ``clean_prompt`` denoiser sees it clean; others see it
        noised to level ``sab`` with the step's own noise (at step 0, ``z`` itself)."""
        if self._clean:
            torch.where(self._mask3, self.ctx_z0, z, out=z)
            return
        zeta = z if step == 0 else self._noise(step, self._zeta)
        torch.where(self._mask3, sab * self.ctx_z0 + s1m * zeta, z, out=z)

    def _denoiser_out(self, z: torch.Tensor, r: int) -> torch.Tensor:
        """The denoiser's output at row ``r`` for the state ``z [B, W, d]`` (its noise or x0
        estimate, as it predicts), with this block's conditioning: the previous x0
        estimate, the clean context's mask and the base model's states."""
        return self.sampler.denoiser(
            z,
            self.table.t[r],
            x0_prev=self.x0 if self._self_cond else None,
            clean_mask=self.mask if self._clean else None,
            temb=self._temb[r],
            temperature=self.sampler.config.score_temperature,
            **self._state_inputs,
        )

    def _denoise_row(self, z: torch.Tensor, r: int) -> torch.Tensor:
        """What row ``r``'s guided step reads: the noise estimate ``[B, W, d]``, or the x0
        estimate on rows whose coefficients take it (``_takes_x0``). Keeps the x0 estimate
        in ``self.x0`` when self-conditioning or an early stop reads it."""
        den = self.sampler.denoiser
        sab, s1m = self._rows[r][SQRT_ABAR], self._rows[r][SQRT_1M_ABAR]
        out = self._denoiser_out(z, r)
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

    def _context_terms(self, z: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The context critics' weighted value ``[B]`` and gradient ``[B, W, d]`` at row
        ``r``'s state ``z`` (a value critic reads the block's positions); None without."""
        if not self.context:
            return None
        value = torch.zeros_like(z[:, 0, 0])  # [B]
        total = torch.zeros_like(z)
        for critic, inputs in zip(self.context, self._critic_inputs, strict=True):
            module = critic.module
            if inputs:  # a value critic scores the block
                block = z.gather(1, self._at_block)
                h, grad = module.value_and_grad(block, self.table.t[r], **inputs)
                total.scatter_add_(1, self._at_block, critic.weight * grad)
            else:
                h, grad = module.value_and_grad(z, self.table.t[r])
                total += critic.weight * grad
            value += critic.weight * h.reshape(-1)
        return value, total

    def _context_grad(self, z: torch.Tensor, r: int) -> torch.Tensor | None:
        if not self.sampler.config.guidance:
            return None
        terms = self._context_terms(z, r)
        return None if terms is None else terms[1].view(-1, z.shape[-1])

    def _mh_eval(self, z: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a MALA row reads of a state ``z [B, W, d]`` at row ``r``'s level: the data
        score ``-eps / sigma`` ``[B, W, d]``, the guidance value ``lambda h`` ``[B]`` and the
        drift ``score + lambda grad h`` ``[B, W, d]`` (the critics of the guided step:
        the token-local stack and the context critics)."""
        sab, s1m = self._rows[r][SQRT_ABAR], self._rows[r][SQRT_1M_ABAR]
        out = self._denoiser_out(z, r)
        eps = (z - sab * out) / s1m if self.sampler.denoiser.config.predicts_x0 else out
        score = eps / -s1m
        value = torch.zeros_like(z[:, 0, 0])  # [B]
        grad = torch.zeros_like(z)
        if self.stack is not None:
            h, g = critic_value_and_grad(z.reshape(-1, z.shape[-1]), self.stack.row(r), self.window)
            value += h
            grad += g.view_as(z)
        terms = self._context_terms(z, r)
        if terms is not None:
            value += terms[0]
            grad += terms[1]
        return score, self.guidance * value, score + self.guidance * grad

    def _mh_row(self, z: torch.Tensor, r: int, out: torch.Tensor) -> None:
        """A MALA row (:mod:`fastdia.mala`): propose the corrector's move from ``z`` on the
        positions that are not context, accept or reject it per row, write the result into
        ``out`` ``[B, W, d]`` and count the accepted moves. Graph-safe (no host read); the
        self-conditioning input stays the last predictor row's x0 estimate, so that both
        states of a row are scored under one conditioning."""
        assert self._mh_draw is not None and self._mh_free is not None
        delta, free = self._rows[r][C], self._mh_free
        current = self._mh_cache if self._mh_cache is not None else self._mh_eval(z, r)
        draw = noise.randn_rows(self.state.seeds, self._steps[r + 1], self._mh_draw)
        zeta = draw[:, :-1].view_as(z)  # the corrector row's own noise at this step
        proposal = mala.propose(z, current[2], zeta, delta, free)
        moved = self._mh_eval(proposal, r)
        log_alpha = mala.log_accept(
            z,
            proposal,
            (current[0], moved[0]),
            (current[2], moved[2]),
            (current[1], moved[1]),
            delta,
            free,
        )
        ok = mala.accept(log_alpha, draw[:, -1])
        torch.where(ok[:, None, None], proposal, z, out=out)
        self.mh_accepted += ok
        # the next MALA row at this level starts from this row's result; a re-noised
        # context (no clean prompt) changes the state between rows, so nothing is kept
        if self._clean and self.table.is_adjusted(r + 1) and self._rows[r + 1] == self._rows[r]:
            keep = ok[:, None, None]
            self._mh_cache = (
                torch.where(keep, moved[0], current[0]),
                torch.where(ok, moved[1], current[1]),
                torch.where(keep, moved[2], current[2]),
            )
        else:
            self._mh_cache = None

    def _zo_grad(self, z: torch.Tensor, inp: torch.Tensor, r: int) -> torch.Tensor:
        """The zeroth-order estimate at row ``r`` from what the step reads (the x0 estimate,
        or the noise estimate converted to one)."""
        assert self.zo is not None
        if self._takes_x0[r]:
            x0 = inp
        else:
            x0 = (z - self._rows[r][SQRT_1M_ABAR] * inp) / self._rows[r][SQRT_ABAR]
        return self.zo.grad(x0, r)

    def _guide_grad(self, z: torch.Tensor, inp: torch.Tensor, r: int) -> torch.Tensor | None:
        """The gradient row ``r``'s guided step reads besides the fused critic stack's:
        ``[B * W, d]`` from the context critics, the zeroth-order estimate or the amortised
        proposal (None: the stack's alone)."""
        if self.zo is not None:
            return self._zo_grad(z, inp, r)
        if self.proposal is not None:
            if not self.sampler.config.guidance:
                return None
            return proposal_grad(z.view(-1, z.shape[-1]), self.proposal.row(r), self.window)
        return self._context_grad(z, r)

    def _guided_row(self, z: torch.Tensor, r: int, out: torch.Tensor) -> None:
        """Row ``r``'s guided step (predictor or Langevin corrector) from ``z`` into ``out``
        (both ``[B, W, d]``): the denoiser's estimate, the critics' (or the zeroth-order,
        or the amortised proposal's) gradient, one fused kernel."""
        cfg, dim = self.sampler.config, self.sampler.space.dim
        inp = self._denoise_row(z, r)
        self._guided_step(
            z.view(-1, dim),
            inp.reshape(-1, dim),
            self.coef[r],
            seq_len=self.window,
            seed=self.state.seeds,
            step=self._steps[r + 1],
            guidance=self.guidance,
            critic=self.stack.row(r) if self.stack is not None else None,
            grad=self._guide_grad(z, inp, r),
            noise_kappa=cfg.noise_kappa,
            out=out.view(-1, dim),
        )

    @torch.no_grad()
    def denoise(self) -> None:
        """One block's diffusion on the static buffers (what a CUDA graph captures).

        Reads the token buffer, the generated count and the seeds; leaves the final state
        in :attr:`z`, the x0 estimate in ``x0``, and the block's latent in
        ``state.latent``; with the nearest decode, writes the block's tokens into
        ``state.tokens`` and advances ``state.generated`` by ``K``. With
        ``SamplerConfig.noise_latent`` (an ablation) the latent is the block's initial
        noise ``z_T`` and no step runs.
        """
        cfg, space, st = self.sampler.config, self.sampler.space, self.state
        dim = space.dim
        self._layout()
        if self.zo is not None:
            self.zo.start_block()
        z = self._noise(0, self._bufs[0])
        if cfg.noise_latent:  # the ablation: the block's z_T stands in for the latent
            torch.gather(z, 1, self.block_pos[:, :, None].expand(-1, -1, dim), out=st.latent)
            return
        if self._need_x0:
            self.x0.zero_()
        self._write_context(z, 0, self._rows[0][SQRT_ABAR], self._rows[0][SQRT_1M_ABAR])
        self._mh_cache = None
        for r in range(len(self.table)):
            nxt = self._bufs[(r + 1) % 2]
            if self.table.is_adjusted(r):
                self._mh_row(z, r, nxt)
            else:
                self._guided_row(z, r, nxt)
            z = nxt
            row = self._rows[r]
            self._write_context(z, r + 1, row[SQRT_ABAR_NEXT], row[SQRT_1M_ABAR_NEXT])
        at_block = self._at_block
        torch.gather(z, 1, at_block, out=st.latent)
        if self.nearest:
            final = st.latent if cfg.stop_at == 0 else self.x0.gather(1, at_block)
            ids = self._round(final, space.weight, self.bias)
            st.tokens.index_copy_(1, self._ar_k + (st.generated + st.prompt_cap), ids)
            st.generated.add_(st.block)
