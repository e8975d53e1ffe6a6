"""``fastdia bench sentiment``: the DExperts sentiment-steering benchmark
(:mod:`fastdia.bench_sentiment`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastdia.errors import ConfigError

BENCH_BASELINES = "base@decode,best-of-4@decode,best-of-16@decode,tilt-only"
"""The benchmark's baseline rows: every one matched to the decode's temperature."""


def add_parser(sub: Any) -> None:
    """Register ``bench`` and its ``sentiment`` benchmark."""
    from fastdia.cli_eval import add_eval_options

    bench = sub.add_parser("bench", help="public benchmarks")
    which = bench.add_subparsers(dest="benchmark", required=True)
    p = which.add_parser(
        "sentiment",
        help="the DExperts sentiment-steering benchmark (OpenWebText prompts toward "
        "positive and toward negative)",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=100,
        help="the first N prompts of each set (neutral, negative, positive); default 100",
    )
    p.add_argument(
        "--samples-per-prompt", type=int, default=4, help="samples per prompt (default 4)"
    )
    add_eval_options(p, bench=True)
    p.set_defaults(
        func=cmd_bench_sentiment,
        new_tokens=20,
        score="continuation",
        rewards="sentiment",
        baselines=BENCH_BASELINES,
        out="bench-sentiment.json",
    )


def cmd_bench_sentiment(args: argparse.Namespace) -> int:
    from fastdia import bench_sentiment

    if args.samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    eval_args = argparse.Namespace(**vars(args))
    eval_args.num_samples = args.samples_per_prompt
    eval_args.prompt_sets = ""
    bench_sentiment.run(args, eval_args, ["fastdia", *sys.argv[1:]])
    return 0
