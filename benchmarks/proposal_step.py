"""The amortised proposal's guided step against the critics' fused one.

From the repository root, with a checkpoint folder that holds a ``proposal.*``
(``fastdia train-proposal``)::

    python -m benchmarks.proposal_step --checkpoint CKPT [--batch 8 --new-tokens 32]

Builds two samplers over the checkpoint with its ``sampling.json`` for ``--reward``: the
critics' gradient in the fused step (``guidance_estimator="critic"``), and the
proposal's (``"proposal"``). Times (median of ``--repeats``, after a warm-up) at the
diffusion's shapes (``batch x window`` positions): the guided step without guidance (the
floor), with the critic stack fused, and the proposal's prediction plus the step that reads
it; the denoiser's forward pass for scale; and whole runs of ``--new-tokens`` tokens (LM
decode included), as seconds per 100 generated tokens.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import emit_result, median_seconds
from fastdia.base_model import load_base_model
from fastdia.models.checkpoint import load_checkpoint
from fastdia.models.proposal import proposal_grad
from fastdia.pipeline import build_sampler, resolve_checkpoint, sampler_config, sampling_settings
from fastdia.rewards import build_rewards

PROMPT = "The movie was"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--reward", default="sentiment")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = load_base_model()
    ckpt_dir = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(ckpt_dir, base.space)
    reward = build_rewards(args.reward)
    guide = list(zip(reward.names, reward.weights, strict=True))
    samplers = {}
    for estimator in ("critic", "proposal"):
        settings = sampling_settings(ckpt_dir, args.reward, guidance_estimator=estimator)
        config = sampler_config(settings)
        built = build_sampler(base, config, rewards=guide, checkpoint=ckpt_dir, loaded=ckpt)
        samplers[estimator] = built.sampler
    prompt_tokens = len(base.space.encode(PROMPT))
    plans = {
        k: s.plan(args.batch, args.new_tokens, prompt_tokens=prompt_tokens)
        for k, s in samplers.items()
    }
    critic_d, proposal_d = plans["critic"].diffusion, plans["proposal"].diffusion
    window, dim = critic_d.window, base.space.dim
    n = args.batch * window
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, dim, generator=g)
    eps = torch.randn(n, dim, generator=g)
    r = len(critic_d.table) // 2  # a row in the middle of the table
    step = critic_d._guided_step
    common = {"seq_len": window, "seed": 0, "step": 1, "guidance": critic_d.guidance}
    coef = critic_d.coef[r]
    assert proposal_d.proposal is not None and critic_d.stack is not None
    fold = proposal_d.proposal.row(r)
    with torch.no_grad():
        parts = {
            "step_without_guidance": median_seconds(
                lambda: step(z, eps, coef, **common), args.repeats
            ),
            "step_with_critic_stack": median_seconds(
                lambda: step(z, eps, coef, critic=critic_d.stack.row(r), **common), args.repeats
            ),
            "proposal_prediction": median_seconds(
                lambda: proposal_grad(z, fold, window), args.repeats
            ),
            "step_with_proposal": median_seconds(
                lambda: step(z, eps, coef, grad=proposal_grad(z, fold, window), **common),
                args.repeats,
            ),
            "denoiser_row": median_seconds(
                lambda: critic_d._denoiser_out(z.view(args.batch, window, dim), r), args.repeats
            ),
        }
    floor = parts["step_without_guidance"]
    runs = {}
    for estimator, plan in plans.items():
        seconds = median_seconds(lambda plan=plan: plan.run(PROMPT, seed=0), args.runs)
        runs[estimator] = {
            "run_s": seconds,
            "s_per_100_tokens": 100 * seconds / (args.batch * args.new_tokens),
        }
    emit_result(
        "proposal_step",
        sys.argv[1:] if argv is None else argv,
        args.out,
        {
            "checkpoint": str(ckpt_dir),
            "reward": args.reward,
            "batch": args.batch,
            "window": window,
            "dim": dim,
            "table_rows": len(critic_d.table),
            "backend": samplers["critic"].backends,
            "threads": torch.get_num_threads(),
            "parts_s": parts,
            "guidance_s": {
                "critic_stack_in_step": parts["step_with_critic_stack"] - floor,
                "proposal_and_its_input": parts["step_with_proposal"] - floor,
            },
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
