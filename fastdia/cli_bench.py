"""``fastdia bench``: the DExperts sentiment-steering benchmark
(:mod:`fastdia.bench_sentiment`) and the toxicity task (:mod:`fastdia.bench_toxicity`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastdia.errors import ConfigError

BENCH_BASELINES = "base@decode,best-of-4@decode,tilt-only"
"""The benchmarks' baseline rows, every one matched to the decode's temperature: the base
model, best-of-4 and the tilt-only decode (best-of-16 writes 16 samples per output, 4x
best-of-4's time: add ``--baselines ...,best-of-16@decode`` where time allows; the CPU runs
of 100 prompts leave it out to finish in about an hour)."""


def add_parser(sub: Any) -> None:
    """Register ``bench`` and its ``sentiment`` and ``toxicity`` benchmarks."""
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
    p.add_argument(
        "--directions",
        default="positive,negative",
        help="steering directions to run, comma-separated: positive (neutral and negative "
        "prompts), negative (neutral and positive prompts); default both",
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
    _add_toxicity(which)


def _add_toxicity(which: Any) -> None:
    from fastdia import bench_toxicity as bt
    from fastdia.cli_eval import add_eval_options

    p = which.add_parser(
        "toxicity",
        help="steer away from toxic text on prompts mined from the base model's own samples "
        "(expected maximum toxicity, toxicity probability)",
    )
    p.add_argument(
        "--num-prompts", type=int, default=100, help="the first N prompts of the set (100)"
    )
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=bt.SAMPLES_PER_PROMPT,
        help=f"samples per prompt (default {bt.SAMPLES_PER_PROMPT}; the protocol asks >= 8)",
    )
    p.add_argument(
        "--prompt-set",
        choices=bt.SETS,
        default="eval",
        help="eval (results) or tune (where settings are chosen)",
    )
    add_eval_options(p, bench=True)
    p.set_defaults(
        func=cmd_bench_toxicity,
        new_tokens=20,
        score="continuation",
        rewards=bt.GUIDE,
        baselines=BENCH_BASELINES,
        judges=bt.JUDGES,
        out="bench-toxicity.json",
    )


def _eval_args(args: argparse.Namespace) -> argparse.Namespace:
    """The eval's options of a benchmark run (its samples per prompt, its own prompts)."""
    if args.samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    eval_args = argparse.Namespace(**vars(args))
    eval_args.num_samples = args.samples_per_prompt
    eval_args.prompt_sets = ""
    return eval_args


def cmd_bench_toxicity(args: argparse.Namespace) -> int:
    from fastdia import bench_toxicity, distributed

    bench_toxicity.run(args, _eval_args(args), ["fastdia", *sys.argv[1:]])
    distributed.finish()
    return 0


def cmd_bench_sentiment(args: argparse.Namespace) -> int:
    from fastdia import bench_sentiment, distributed

    bench_sentiment.run(args, _eval_args(args), ["fastdia", *sys.argv[1:]])
    distributed.finish()
    return 0
