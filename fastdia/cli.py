"""The ``fastdia`` command line.

``fastdia sample`` draws guided samples. Every argument is checked before anything heavy
is loaded; errors print one line naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fastdia.cli_options import (
    add_sampling_options,
    guidance_value,
    positive_int,
    sampling_overrides,
)
from fastdia.device import default_device
from fastdia.errors import FastdiaError

log = logging.getLogger("fastdia")

DEFAULT_REWARD = "sentiment"


def _add_sample_parser(sub: Any) -> None:
    from fastdia.base_model import DEFAULT_BASE_MODEL
    from fastdia.embedding import ROUNDINGS
    from fastdia.ops.registry import known_backends

    p = sub.add_parser("sample", help="draw reward-guided samples")
    p.add_argument("--prompt", default=None, help="text every sample starts with")
    p.add_argument(
        "--length", type=positive_int, default=32, help="tokens per sample, prompt included"
    )
    p.add_argument("--num-samples", type=positive_int, default=4, help="samples (the batch size)")
    p.add_argument(
        "--reward",
        default=DEFAULT_REWARD,
        help="NAME[:ARG][:WEIGHT],... e.g. 'sentiment:1,nontoxic:0.5'",
    )
    p.add_argument(
        "--guidance",
        type=guidance_value,
        default=None,
        help="guidance strength lambda (0: unguided; default: the checkpoint's "
        "sampling.json, else 1)",
    )
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed in [0, 2**31)")
    p.add_argument(
        "--backend",
        default=None,
        help=f"op variant, one of: {', '.join(known_backends())} "
        "(default: $FASTDIA_BACKEND, else auto)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder with denoiser.* and critic-*.* (default: the shipped demo)",
    )
    p.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        help="the embedded default, a model folder or a cached Hugging Face id",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use untrained denoiser and critics (to try the whole path)",
    )
    p.add_argument("--rounding", default="l2", help=f"one of: {', '.join(ROUNDINGS)}")
    p.add_argument(
        "--clamp-from",
        type=positive_int,
        default=None,
        help="clamp the x0 estimate to the nearest embedding from this step on",
    )
    p.add_argument(
        "--corrector-steps", type=int, default=0, help="Langevin corrector steps per step"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, then a summary")
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdia", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(sub)
    from fastdia import cli_eval, cli_profile, cli_train

    cli_train.add_parsers(sub)
    cli_eval.add_parser(sub)
    cli_profile.add_parser(sub)
    return parser


def cmd_sample(args: argparse.Namespace) -> int:
    """Run ``fastdia sample``: validate, load, sample, print."""
    from fastdia import ops
    from fastdia.base_model import load_base_model
    from fastdia.ops import registry
    from fastdia.pipeline import (
        build_sampler,
        resolve_checkpoint,
        sampler_config,
        sampling_settings,
    )
    from fastdia.rewards import build_rewards
    from fastdia.sampler import check_seed

    # 1. cheap checks, before anything heavy
    checkpoint = None if args.random_init else resolve_checkpoint(args.checkpoint)
    settings = sampling_settings(checkpoint, **sampling_overrides(args))
    config = sampler_config(
        settings,
        rounding=args.rounding,
        clamp_from=args.clamp_from,
        corrector_steps=args.corrector_steps,
        backend=args.backend,
    )
    guidance = config.guidance
    check_seed(args.seed)
    if args.prompt is not None and not args.prompt.strip():
        raise FastdiaError("--prompt is empty; pass some text, or leave --prompt out")
    device = default_device(args.device)
    for op in ops.SAMPLER_OPS:
        registry.resolve_backend(args.backend, op, device)
    rewards = build_rewards(args.reward)

    # 2. load and build
    base = load_base_model(args.base_model, device=device)
    if args.prompt is not None:
        n_prompt = len(base.space.encode(args.prompt))
        if n_prompt >= args.length:
            raise FastdiaError(
                f"--prompt is {n_prompt} tokens but --length is {args.length}: the length counts "
                f"the prompt, so pass --length > {n_prompt} or a shorter prompt"
            )
    assembly = build_sampler(
        base,
        config,
        rewards=list(zip(rewards.names, rewards.weights, strict=True)),
        checkpoint=checkpoint,
        random_init=args.random_init,
        length=args.length,
        device=device,
    )

    # 3. sample, score, print
    out = assembly.sampler.sample(args.num_samples, args.length, prompt=args.prompt, seed=args.seed)
    true = rewards(out.texts)
    backend = assembly.sampler.backends[ops.GUIDED_STEP]
    for i, text in enumerate(out.texts):
        record = {
            "index": i,
            "text": text,
            "token_ids": out.token_ids[i].tolist(),
            "rewards": {name: float(values[i]) for name, values in true.items()},
            "critic": {name: float(v[i]) for name, v in out.critic_values.items()},
            "seed": args.seed,
        }
        if args.json:
            print(json.dumps(record))
        else:
            scores = " ".join(f"{k}={v:+.3f}" for k, v in record["rewards"].items())
            print(f"[{i}] {scores}\n    {text}")
    summary = {
        "tokens_per_s": out.tokens_per_s,
        "seconds": out.seconds,
        "backend": backend,
        "steps": config.steps,
        "rows": out.steps,
        "num_samples": args.num_samples,
        "length": args.length,
        "sampler": config.sampler,
        "decode": config.decode,
        "stop_at": config.stop_at,
        "lm": dataclasses.asdict(config.lm),
        "guidance": guidance,
        "reward": rewards.spec,
        "base_model": args.base_model,
        "device": device,
        "random_init": args.random_init,
    }
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        print(
            f"{out.token_ids.numel()} tokens in {out.seconds:.2f} s "
            f"({out.tokens_per_s:.1f} tokens/s, backend {backend}, {device})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdia`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except FastdiaError as exc:
        print(f"fastdia {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
