"""``fastdia eval``: the reward/fluency/diversity table over guidance strengths."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Register the ``eval`` subcommand."""
    from fastdia.base_model import DEFAULT_BASE_MODEL

    p = sub.add_parser("eval", help="evaluate guided sampling over guidance strengths")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the demo)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--guide", default="sentiment", help="reward spec whose critics guide")
    p.add_argument("--rewards", default="sentiment,nontoxic", help="true rewards to report")
    p.add_argument(
        "--lambdas",
        default="0,1,2,4,8,16,32,64,128,256",
        help="comma-separated guidance strengths",
    )
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--num-samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="dia")
    p.add_argument("--clamp-from", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base", action="store_true", help="skip the base-model reference row")
    p.add_argument("--out", default="eval.json", help="JSON result file")
    p.add_argument("--plot", default=None, help="PNG plot file (default: --out with .png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)


def _lambdas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lambdas must be comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"--lambdas must be finite numbers >= 0, got {text!r}")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from fastdia.base_model import load_base_model
    from fastdia.cli import default_device
    from fastdia.evaluate import DEFAULT_EVAL_PROMPTS, base_model_row, guided_rows, plot
    from fastdia.pipeline import build_sampler, resolve_checkpoint
    from fastdia.rewards import build_rewards
    from fastdia.sampler import SamplerConfig

    lambdas = _lambdas(args.lambdas)
    guide, report = build_rewards(args.guide), build_rewards(args.rewards)
    SamplerConfig(sampler=args.sampler, steps=args.steps, clamp_from=args.clamp_from)
    prompts = DEFAULT_EVAL_PROMPTS
    if args.prompts:
        prompts = tuple(p for p in Path(args.prompts).read_text().splitlines() if p.strip())
        if not prompts:
            raise ConfigError(f"--prompts {args.prompts} holds no prompts")
    checkpoint = resolve_checkpoint(args.checkpoint)
    device = default_device(args.device)
    base = load_base_model(args.base_model, device=device)
    weights = list(zip(guide.names, guide.weights, strict=True))

    def make(lam: float) -> Any:
        config = SamplerConfig(
            sampler=args.sampler, steps=args.steps, guidance=lam, clamp_from=args.clamp_from
        )
        return build_sampler(
            base, config, rewards=weights, checkpoint=checkpoint, length=args.length, device=device
        ).sampler

    rows = []
    if not args.no_base:
        rows.append(
            base_model_row(base, prompts, args.num_samples, args.length, report, seed=args.seed)
        )
    rows += guided_rows(
        base, make, lambdas, prompts, args.num_samples, args.length, report, seed=args.seed
    )
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}
        | {"checkpoint": str(checkpoint), "prompts": list(prompts), "lambdas": lambdas},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    plot(result, png, report.names[0])
    for row in rows:
        rw = " ".join(f"{k}={v['mean']:+.3f}" for k, v in row["rewards"].items())
        print(
            f"{row['name']:>14}  ppl={row['perplexity']:9.1f}  d1={row['distinct_1']:.2f} "
            f"d2={row['distinct_2']:.2f}  s/100tok={row['seconds_per_100_tokens']:.3f}  {rw}"
        )
    return 0
