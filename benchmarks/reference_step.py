"""CPU (or GPU) time per reference sampler step, with a breakdown by part.

A small random denoiser (the ``--random-init`` one: width 128, 2 layers) over the default
base model's embeddings, one token-local critic, ``B x L`` tokens.

    .venv/bin/python benchmarks/reference_step.py [--batch 4 --length 32 --steps 20]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import median_seconds, write_result

from fastdia import noise, ops
from fastdia.base_model import load_base_model
from fastdia.pipeline import random_models
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-model", default="smollm2-135m")
    args = parser.parse_args()

    base = load_base_model(args.base_model)
    denoiser, critics = random_models(base, ["sentiment"], length=args.length)
    weighted = [WeightedCritic("sentiment", critics["sentiment"], 1.0)]
    # one block of the whole window: --length new tokens after the prompt
    config = SamplerConfig(
        steps=args.steps, guidance=1.0, window=args.length, block_size=args.length
    )
    sampler = Sampler(denoiser, base.space, weighted, config)
    plan = sampler.plan(args.batch, args.length)
    diffusion = plan.diffusion
    b, length, d = args.batch, args.length, base.space.dim

    run_s = median_seconds(lambda: plan.run("The movie was", seed=0), max(1, args.repeats // 2))
    z = torch.randn(b, length, d)
    with torch.no_grad():
        parts = {
            "denoiser_forward": median_seconds(lambda: denoiser(z, 0.5), args.repeats * 4),
            "guided_step": median_seconds(
                lambda: ops.guided_step(
                    z.view(-1, d),
                    z.view(-1, d),
                    diffusion.table.coef[0],
                    seq_len=length,
                    seed=0,
                    step=1,
                    guidance=diffusion.guidance,
                    critic=diffusion.stack.row(0),
                ),
                args.repeats * 4,
            ),
            "philox_noise_only": median_seconds(
                lambda: noise.randn(0, 1, z.numel()), args.repeats * 4
            ),
            "round_to_vocab_final": median_seconds(
                lambda: ops.round_to_vocab(z, base.space.weight, diffusion.bias), args.repeats
            ),
        }
    result = {
        "batch": b,
        "length": length,
        "dim": d,
        "vocab": base.space.vocab_size,
        "steps": args.steps,
        "sampler": "dia",
        "denoiser": {
            "hidden": denoiser.config.hidden,
            "layers": denoiser.config.layers,
            "params": sum(p.numel() for p in denoiser.parameters()),
        },
        "run_s": run_s,
        "per_step_s": run_s / len(diffusion.table),
        "parts_s": parts,
        "tokens_per_s": b * length / run_s,
    }
    print(json.dumps(result, indent=2))
    write_result(f"cpu_reference_step_b{b}_l{length}", result)


if __name__ == "__main__":
    main()
