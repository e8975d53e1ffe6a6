"""Two rewards at once: positive sentiment against non-toxicity over the reward mixture.

For each sentiment weight ``a`` in ``--weights`` the guide is ``sentiment:a,nontoxic:b``
with ``b = --nontoxic-scale x (1 - a)``, all at the checkpoint's top-level guidance (the
demo steers non-toxicity at a quarter of sentiment's: its ``sampling.json`` gives
``nontoxic`` lambda 48 against 192, hence the default scale 0.25), one
``fastdia eval`` run per weight on the first ``--num-prompts`` prompts of the toxicity
task's evaluation set (prompts on which the base model often writes toxic text), with the
default sampler's row and an SMC row (``--particles``); the base model at the decode's
temperature once. Writes ``OUT/pareto.json`` (every run's rows), ``OUT/pareto.md`` and
``OUT/pareto.png`` (positive rate against 1 - toxicity probability, one line per sampler
over the weights, 95% bootstrap intervals over prompts), and each run's own files.

    python scripts/pareto.py --out runs/pareto --num-prompts 16 --num-samples 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fastdia.bench_sentiment import load_prompts
from fastdia.bench_toxicity import SETS, TOXICITY_DIR
from fastdia.cli import main as fastdia
from fastdia.models.checkpoint import sampling_defaults
from fastdia.pipeline import resolve_checkpoint

log = logging.getLogger("pareto")


def guide(weight: float, scale: float) -> str:
    """The reward spec of sentiment weight ``weight``: ``sentiment:a,nontoxic:b``."""
    parts = []
    if weight > 0:
        parts.append(f"sentiment:{weight:g}")
    if weight < 1:
        parts.append(f"nontoxic:{scale * (1 - weight):g}")
    return ",".join(parts)


def point(row: dict[str, Any]) -> dict[str, Any]:
    """A row's place in the plot: positive rate and 1 - toxicity probability (with their
    intervals where the eval gives them), perplexity, distinct-2, seconds per 100 tokens."""
    rewards, ci = row["rewards"], row.get("ci", {})
    tox = rewards["nontoxic"]["toxicity_prob"]
    lo_hi = ci.get("toxicity_prob")
    return {
        "positive": rewards["sentiment"]["positive_frac"],
        "positive_ci": ci.get("positive_frac"),
        "nontoxic": 1 - tox,
        "nontoxic_ci": None if lo_hi is None else [1 - lo_hi[1], 1 - lo_hi[0]],
        "perplexity": row["perplexity"],
        "distinct_2": row["distinct_2"],
        "seconds_per_100_tokens": row["seconds_per_100_tokens"],
    }


def markdown(points: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Sentiment against non-toxicity over the reward mixture",
        "",
        f"`{command}`",
        "",
        "| sampler | guide | positive | 1 - toxicity prob | ppl | d2 | s / 100 tok |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        pos_ci, tox_ci = p["positive_ci"], p["nontoxic_ci"]
        pos = f"{p['positive']:.0%}" + (f" [{pos_ci[0]:.0%}, {pos_ci[1]:.0%}]" if pos_ci else "")
        tox = f"{p['nontoxic']:.0%}" + (f" [{tox_ci[0]:.0%}, {tox_ci[1]:.0%}]" if tox_ci else "")
        lines.append(
            f"| {p['sampler']} | {p['guide']} | {pos} | {tox} | {p['perplexity']:.1f} | "
            f"{p['distinct_2']:.2f} | {p['seconds_per_100_tokens']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for sampler in dict.fromkeys(p["sampler"] for p in points):
        line = [p for p in points if p["sampler"] == sampler]
        xs, ys = [p["positive"] for p in line], [p["nontoxic"] for p in line]
        style = "o-" if len(line) > 1 else "s"
        ax.plot(xs, ys, style, label=sampler)
        for p in line:
            if p["weight"] is not None:
                ax.annotate(f"{p['weight']:g}", (p["positive"], p["nontoxic"]), fontsize=7)
    ax.set_xlabel("positive rate (VADER)")
    ax.set_ylabel("1 - toxicity probability (profanity model)")
    ax.set_title("sentiment weight a: guide sentiment:a, nontoxic:scale(1 - a)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for every file")
    parser.add_argument("--weights", default="1,0.75,0.5,0.25,0")
    parser.add_argument("--nontoxic-scale", type=float, default=0.25)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--judges", default="afinn,better-profanity")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = [float(w) for w in args.weights.split(",")]
    prompts = load_prompts("eval", args.num_prompts, folder=TOXICITY_DIR, sets=SETS)
    # one guidance for every mixture (a single-reward guide would take its own per-reward
    # default): the checkpoint's top-level lambda, so nontoxic alone runs at its scale
    lam = sampling_defaults(resolve_checkpoint(None))["guidance"]
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    points: list[dict[str, Any]] = []
    for i, weight in enumerate(weights):
        spec = guide(weight, args.nontoxic_scale)
        result = out / f"weight-{weight:g}.json"
        if not result.is_file():  # a run cut short resumes at the first missing weight
            argv_eval = ["eval", "--guide", spec, "--rewards", "sentiment,nontoxic"]
            argv_eval += ["--guidance", f"{lam:g}"]
            argv_eval += ["--prompt-sets", str(prompt_file), "--num-samples", str(args.num_samples)]
            argv_eval += ["--new-tokens", str(args.new_tokens), "--judges", args.judges]
            argv_eval += ["--score", "continuation", "--out", str(result)]
            argv_eval += ["--baselines", "base@decode" if i == 0 else "none"]
            argv_eval += ["--variant", f"smc{args.particles}:particles={args.particles}"]
            log.info("weight %g: fastdia %s", weight, " ".join(argv_eval))
            if fastdia(argv_eval) != 0:
                return 1
        rows = next(iter(json.loads(result.read_text())["sets"].values()))
        for row in rows:
            if row["kind"] == "baseline":
                sampler, w = "base model (T = 0.8)", None
            else:
                sampler = "SMC" if row["settings"]["particles"] > 1 else "fastdia default"
                sampler += f" ({row['name']})" if sampler == "SMC" else ""
                w = weight
            points.append({"sampler": sampler, "guide": spec, "weight": w} | point(row))
    command = "python scripts/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "pareto.json").write_text(json.dumps({"command": command, "points": points}, indent=1))
    (out / "pareto.md").write_text(markdown(points, command))
    plot(points, out / "pareto.png")
    log.info("wrote %s", out / "pareto.md")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run())
