"""What a sampler run returns: :class:`SampleOutput`, row by row (prompts, completions,
texts, tokens, critic values, timing and the code paths that ran)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdia.errors import ConfigError


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
        smc: with SMC particles, :meth:`fastdia.smc.Particles.summary` (``log_z`` per
            group, ``ess`` and ``resampled`` per block); for several batches
            (:meth:`concat`), ``{"batches": [...]}``. None without SMC.
        mh: with MALA rows, ``{"steps", "snr", "proposed", "accepted"}``: the rows'
            settings and, per row, the moves proposed and accepted (see
            :attr:`mh_acceptance`). None without.
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
    smc: dict[str, Any] | None = None
    mh: dict[str, Any] | None = None

    @property
    def mh_acceptance(self) -> float | None:
        """The fraction of MALA moves accepted over every row (None without MALA rows)."""
        if self.mh is None:
            return None
        proposed = sum(self.mh["proposed"])
        return sum(self.mh["accepted"]) / proposed if proposed else float("nan")

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
            smc=None if first.smc is None else {"batches": [o.smc for o in outputs]},
            mh=None
            if first.mh is None
            else first.mh
            | {k: [n for o in outputs for n in o.mh[k]] for k in ("proposed", "accepted")},
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
            smc=self.smc,
            mh=None
            if self.mh is None
            else self.mh | {k: self.mh[k][cut] for k in ("proposed", "accepted")},
        )
