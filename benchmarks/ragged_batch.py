"""What a batch of different prompts costs, beside a batch of one prompt and separate calls.

From the repository root::

    python -m benchmarks.ragged_batch                    # 16 prompts, 64 new tokens (CPU: minutes)
    python -m benchmarks.ragged_batch --cli-calls 4      # fewer separate CLI calls (quicker)

Three ways to write one sample for each of ``--rows`` prompts (the shipped eval prompt
sets, neutral then negative, of different lengths) with the shipped demo's default path,
``--new-tokens`` each:

* ``ragged``: one batch of the ``--rows`` different prompts (``plan.run(prompts, seeds)``);
* ``one-prompt``: one batch of ``--rows`` samples of the first prompt (the same plan);
* ``cli``: ``fastdia sample --prompt P --num-samples 1`` per prompt in a fresh process
  (models loaded every call), timed for ``--cli-calls`` prompts and scaled to ``--rows``.

The in-process rows are timed over ``--repeats`` rounds after a warm-up, taking turns
(median); the CLI calls by wall time of the whole process (the same threads: set
``OMP_NUM_THREADS`` and ``taskset`` for the whole command). Writes one JSON object
(device, versions, git sha, date, the command, the seconds and the ratios) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS
from fastdia.provenance import environment

log = logging.getLogger("ragged_batch")


def _interleaved_medians(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median wall seconds of each ``runs[name]()``, the runs taking turns (a warm-up of
    each, then ``repeats`` rounds), so that a slow drift of the machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up (plans)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ragged_batch", description=__doc__)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cli-calls", type=int, default=16, help="separate CLI calls to time")
    p.add_argument("--out", default=str(RESULTS / "ragged_batch_cpu.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from fastdia.base_model import load_base_model
    from fastdia.evaluate import prompt_set
    from fastdia.pipeline import DEMO_CHECKPOINT, build_sampler, sampler_config, sampling_settings

    prompts = (prompt_set("neutral") + prompt_set("negative"))[: args.rows]
    base = load_base_model()
    sampler = build_sampler(
        base, sampler_config(sampling_settings(DEMO_CHECKPOINT)), rewards=[("sentiment", 1.0)]
    ).sampler
    longest = max(len(sampler.encode(x)) for x in prompts)
    plan = sampler.plan(len(prompts), args.new_tokens, prompt_tokens=longest)
    seeds = list(range(len(prompts)))
    with torch.no_grad():
        medians = _interleaved_medians(
            {
                "ragged": lambda: plan.run(prompts, seed=seeds, new_tokens=args.new_tokens),
                "single": lambda: plan.run(prompts[0], seed=seeds, new_tokens=args.new_tokens),
            },
            args.repeats,
        )
    ragged, single = medians["ragged"], medians["single"]
    calls = []
    for i, prompt in enumerate(prompts[: args.cli_calls]):
        cmd = [sys.executable, "-m", "fastdia.cli", "sample", "--prompt", prompt]
        cmd += ["--num-samples", "1", "--new-tokens", str(args.new_tokens), "--seed", str(i)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        calls.append(time.perf_counter() - start)
        log.info("CLI call %d: %.1f s", i, calls[-1])
    cli = statistics.mean(calls) * len(prompts)
    env = environment(torch.device("cpu"))
    result = {
        "device": env["device"],
        "git_sha": env["git_sha"],
        "date": env["date"],
        "versions": {k: env.get(k) for k in ("python", "torch", "triton", "fastdia")},
        "command": "python -m benchmarks.ragged_batch " + " ".join(argv or sys.argv[1:]),
        "rows": len(prompts),
        "new_tokens": args.new_tokens,
        "prompt_tokens": [len(sampler.encode(x)) for x in prompts],
        "block_size": sampler.block_size,
        "seconds": {"ragged": ragged, "one_prompt": single, "cli_calls_scaled": cli},
        "cli_calls_timed": len(calls),
        "cli_seconds_per_call": calls,
        "ratio_ragged_to_one_prompt": ragged / single,
        "ratio_cli_to_ragged": cli / ragged,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("seconds", "ratio_ragged_to_one_prompt", "ratio_cli_to_ragged")
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
