"""A sampler's plan for one batch shape (docs/design.md §2): the buffers of the block loop,
the block diffusion and the LM decode bound to them, their CUDA graphs, and the run that
samples with them (see :mod:`fastdia.sampler` for the loop)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastdia.decode import DecodePlan
from fastdia.device import capture_graph
from fastdia.embedding import EmbeddingSpace
from fastdia.errors import ConfigError
from fastdia.models.critic import TokenLocalCritic
from fastdia.prompts import Prompt, cut_completions
from fastdia.run_checks import check_new_tokens, row_seed_list
from fastdia.sample_output import SampleOutput
from fastdia.smc import Particles, child_seed, score_texts
from fastdia.window import BlockState, WindowDiffusion

if TYPE_CHECKING:
    from fastdia.sampler import Sampler, WeightedCritic

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2  # eager runs on a side stream before a CUDA graph capture


def _local(critic: WeightedCritic) -> bool:
    return isinstance(critic.module, TokenLocalCritic)


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
        self.smc = cfg.particles > 1  # eager: resampling reads the weights back
        # SMC's resampling and zeroth-order guidance read back to the host: eager
        host = self.smc or cfg.guidance_estimator == "zo"
        self.captures = cfg.cuda_graph and device.type == "cuda" and not host
        self.particles: Particles | None = None
        # the run's prompt rows and chat flag (SMC's and zeroth-order's rewards read the
        # text as SampleOutput.texts does) and each row's last weighted reward (SMC's twist)
        self._reading: tuple[list[list[int]], bool] = ([], False)
        self._last_reward = torch.zeros(batch_size, dtype=torch.float64)
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
                smc=self.smc,
                smc_tilted=cfg.smc_twist == "critic",
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
        if self.smc:
            paths["smc_particles"] = self.sampler.config.particles
        if self.decode_plan is not None:
            paths |= {
                "decode_graph": self.decode_plan.graphed,
                "kv_cache": "static" if self.decode_plan.static else "dynamic",
                "decode_head": "tied" if self.decode_plan.fused else "general",
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
        if self.diffusion is not None:
            self.diffusion.mh_accepted.zero_()

    def _start_token(self) -> int:
        tok = self.sampler.space.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return int(start if start is not None else 0)

    # ---- the loop -----------------------------------------------------------------------
    def generate(self, new_tokens: int) -> int:
        """The block loop on the buffers (after :meth:`set_inputs`): the LM prefill, then
        ``ceil(new_tokens / K)`` blocks of diffusion and decode (the last block's decode
        stops at ``new_tokens``). Graph-safe but for the prefill (and SMC's resampling, which
        reads the weights back). Returns the blocks run."""
        if self.decode_plan is not None:
            self.decode_plan.start()
            if self.smc:
                log_w, cfg = self.decode_plan.log_w, self.sampler.config
                assert log_w is not None
                self.particles = Particles.start(log_w, cfg.particles, cfg.ess_threshold)
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
                if self.smc:
                    self._resample(j, final=j == blocks - 1)
        return blocks

    def _check_groups(self, rows: list[list[int]]) -> None:
        """SMC's groups of ``particles`` consecutive rows must each share one prompt."""
        size = self.sampler.config.particles
        if self.batch_size % size:
            raise ConfigError(
                f"SMC with {size} particles needs a batch that is a multiple of {size}, got "
                f"{self.batch_size} rows"
            )
        for g in range(0, len(rows), size):
            if any(r != rows[g] for r in rows[g : g + size]):
                raise ConfigError(
                    f"SMC: rows {g}..{g + size - 1} are one particle system and must share "
                    "one prompt; give each prompt a multiple of particles rows, in order"
                )

    def _resample(self, block: int, *, final: bool) -> None:
        """SMC after block ``block`` (:mod:`fastdia.smc`): the reward weighting where set,
        then the groups whose ESS fell under the threshold (every group when ``final``) are
        resampled; rows that took a parent take child seeds (not after the last block: no
        noise is drawn after it)."""
        cfg, st, plan, particles = self.sampler.config, self.state, self.decode_plan, self.particles
        assert plan is not None and particles is not None
        if cfg.smc_reward_weight and (final or cfg.smc_twist == "reward"):
            self._weigh_by_reward(final)
        seeds = st.seeds.tolist()
        parents = particles.step(block, seeds, final=final)
        if parents is None:
            return
        plan.reorder(parents)
        self._last_reward = self._last_reward[parents]
        if final:
            return
        redo = particles.resampled[-1]
        fresh = [
            child_seed(seeds[int(parent)], b, block) if redo[b // cfg.particles] else seeds[b]
            for b, parent in enumerate(parents)
        ]
        st.seeds.copy_(torch.tensor(fresh, dtype=torch.int64))

    def _weigh_by_reward(self, final: bool) -> None:
        """Add the true reward's weight to every row's log-weight: with the reward twist,
        ``W (r_j - r_{j-1})`` for the text after this block (``r_0 = 0``); with the critic
        twist (final block only), ``W r(x)`` in place of the twist the decode added (the
        rows' sums of ``beta u``), so the last weights target ``p_T(x) exp(W r(x))``."""
        sampler, plan = self.sampler, self.decode_plan
        assert plan is not None and plan.log_w is not None and plan.twist is not None
        assert sampler.reward is not None  # Sampler checked
        rows, chat = self._reading
        texts = self.state.read_so_far(rows, sampler.special.stop, chat=chat)
        score = sampler.config.smc_reward_weight * score_texts(
            sampler.reward, [sampler.space.decode(r) for r in texts], sampler.reward_name
        )
        if sampler.config.smc_twist == "reward":
            increment = score - self._last_reward
        else:
            increment = score - plan.twist.cpu()
        plan.log_w += increment.to(plan.log_w.device)
        self._last_reward = score

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
        if self.smc:
            self._check_groups(rows)
            self._last_reward.zero_()
        self._reading = (rows, chat)  # what SMC's and zeroth-order's rewards read
        if self.diffusion is not None and self.diffusion.zo is not None:
            self.diffusion.zo.reading = self._reading
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
        diffusion = self.diffusion
        if diffusion is not None and diffusion.mh_rows and not sampler.config.noise_latent:
            out.mh = {
                "steps": sampler.config.mh_steps,
                "snr": sampler.config.mh_snr,
                "proposed": [diffusion.mh_rows * blocks] * self.batch_size,
                "accepted": diffusion.mh_accepted.round().long().tolist(),
            }
        if self.particles is not None:
            cfg = sampler.config
            out.smc = self.particles.summary() | {
                "twist": cfg.smc_twist,
                "reward_weight": cfg.smc_reward_weight,
            }
        return out

    def _outputs(
        self, rows: list[list[int]], seeds: list[int], tokens: torch.Tensor, chat: bool
    ) -> SampleOutput:
        """Cut every row at its first end token and decode (host side, after timing)."""
        sampler = self.sampler
        space = sampler.space
        completion, finished, read = cut_completions(
            rows, tokens.tolist(), sampler.special.stop, chat=chat
        )
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
