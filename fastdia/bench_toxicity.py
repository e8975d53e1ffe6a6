"""``fastdia bench toxicity``: steering away from toxic text, the RealToxicityPrompts way.

No RealToxicityPrompts copy installs offline, so the prompts are mined from the base
model's own samples (``scripts/mine_toxic_prompts.py``): the OpenWebText half-sentences of
the sentiment benchmark on which the base model most often writes toxic continuations,
dealt into a tuning set (``tune``: sampling settings are chosen there) and an evaluation
set (``eval``: results are reported there), shipped in ``fastdia/assets/benchmarks/
toxicity``. The guide and the reward are ``nontoxic`` (the profanity model); every method
writes ``--samples-per-prompt`` continuations of 20 tokens per prompt (the protocol asks
for at least 8; it used 25), scored on the continuation alone. Reported per row, with 95%
bootstrap intervals over prompts: the expected maximum toxicity and the toxicity
probability (:mod:`fastdia.stats`) under the reward, the toxicity probability and the
reward hacking under the independent word-list judge (``better-profanity``), perplexity
under the base model and under the judge LM, dist-1/2/3, the degenerate fraction and
seconds per 100 generated tokens. It is one ``fastdia eval`` run (:func:`fastdia.cli_eval.
run_eval`): its JSON, then this benchmark's Markdown table and plot beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastdia.bench_sentiment import load_prompts

TOXICITY_DIR = Path(__file__).resolve().parent / "assets" / "benchmarks" / "toxicity"
SETS = ("eval", "tune")
GUIDE = "nontoxic"
JUDGES = "gemma3-270m,better-profanity"
SAMPLES_PER_PROMPT = 8


def _ci(row: dict[str, Any], metric: str, fmt: str) -> str:
    lo_hi = row.get("ci", {}).get(metric)
    return "" if lo_hi is None else f" [{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]"


def _judge(row: dict[str, Any], metric: str) -> tuple[str, float | None]:
    """The first judge that reports ``metric``: its name and value."""
    for name, values in row.get("judges", {}).items():
        if metric in values:
            return name, values[metric]
    return "", None


def markdown(result: dict[str, Any], command: str) -> str:
    """The benchmark's table: one row per method."""
    cfg = result["config"]
    (set_name, rows), *_ = result["sets"].items()
    samples = cfg["num_samples"]
    word_judge = next((_judge(r, "toxic_frac")[0] for r in rows if _judge(r, "toxic_frac")[0]), "")
    lm_judge = next((_judge(r, "perplexity")[0] for r in rows if _judge(r, "perplexity")[0]), "")
    lines = [
        "# fastdia on the mined toxicity prompts",
        "",
        f"{len(cfg['prompts'][set_name])} prompts ({set_name.removeprefix('toxicity-')} set), "
        f"{samples} samples each, "
        f"{cfg['new_tokens']} new tokens; base model {cfg['base_model']}; guide and reward "
        f"`{GUIDE}` (1 - the profanity model's probability), read on the continuation alone. "
        "Expected maximum toxicity: the mean over prompts of the most toxic of a prompt's "
        "samples; toxicity probability: the share of prompts with at least one sample of "
        f"toxicity >= 0.5. The word-list judge ({word_judge or 'none'}) flags a sample that "
        "holds a listed word; hacking: samples the reward calls non-toxic that the judge "
        "flags, or degenerate ones. Lower is better in the first four columns. 95% bootstrap "
        "intervals over prompts in brackets.",
        "",
        f"Command: `{command}`",
        "",
        "| method | exp. max toxicity | toxicity prob. | toxicity prob. (word list) | "
        f"hacking | ppl (base) | ppl ({lm_judge or 'judge LM'}) | dist-1 | dist-2 | dist-3 | "
        "degenerate | s / 100 tok |",
        "| " + " | ".join(["---"] * 12) + " |",
    ]
    for row in rows:
        tox = row["rewards"].get(GUIDE, {})
        emt, prob = tox.get("expected_max_toxicity"), tox.get("toxicity_prob")
        _, judged = _judge(row, "toxicity_prob")
        _, hack = _judge(row, "reward_hacking_frac")
        _, ppl_judge = _judge(row, "perplexity")
        cells = [
            row["name"],
            "n/a" if emt is None else f"{emt:.3f}{_ci(row, 'expected_max_toxicity', '.3f')}",
            "n/a" if prob is None else f"{prob:.2f}{_ci(row, 'toxicity_prob', '.2f')}",
            "n/a" if judged is None else f"{judged:.2f}{_ci(row, 'judge_toxicity_prob', '.2f')}",
            "n/a" if hack is None else f"{100 * hack:.1f}%",
            f"{row['perplexity']:.1f}{_ci(row, 'perplexity', '.1f')}",
            "n/a" if ppl_judge is None else f"{ppl_judge:.1f}",
            f"{row['distinct_1']:.2f}",
            f"{row['distinct_2']:.2f}",
            f"{row['distinct_3']:.2f}",
            f"{100 * row['degenerate_frac']:.1f}%",
            f"{row['seconds_per_100_tokens']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Expected maximum toxicity against base-model perplexity, one point per row (95%
    intervals), the rows of one family joined in order of strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdia.evaluate import trade_off_lines

    (set_name, rows), *_ = result["sets"].items()
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for row in rows:
        emt = row["rewards"].get(GUIDE, {}).get("expected_max_toxicity")
        if emt is None:
            continue
        ci = row.get("ci", {})
        lo, hi = ci.get("expected_max_toxicity", [emt, emt])
        ax.errorbar(
            [row["perplexity"]],
            [emt],
            yerr=[[max(emt - lo, 0.0)], [max(hi - emt, 0.0)]],
            fmt="o" if row["kind"] == "fastdia" else "s",
            ms=6,
        )
        ax.annotate(
            row["name"][:40],
            (row["perplexity"], emt),
            fontsize=6,
            xytext=(4, 3),
            textcoords="offset points",
        )
    trade_off_lines(
        ax, rows, lambda row: row["rewards"].get(GUIDE, {}).get("expected_max_toxicity")
    )
    ax.set_xscale("log")
    ax.set_xlabel("base-model perplexity of the continuation (log scale)")
    ax.set_ylabel("expected maximum toxicity (profanity model)")
    ax.set_title(f"toxicity, {set_name} prompts (lower is better)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: Any, eval_args: Any, command: Sequence[str]) -> dict[str, Any] | None:
    """Run the benchmark (``eval_args``: the eval's options, completed here): the eval's
    JSON at ``args.out``, this benchmark's Markdown table and PNG beside it (rank 0 under
    ``torchrun``; the others return None)."""
    from fastdia.cli_eval import run_eval

    prompts = load_prompts(args.prompt_set, args.num_prompts, folder=TOXICITY_DIR, sets=SETS)
    out = Path(args.out)
    eval_args.guide = GUIDE
    eval_args.out = str(out)
    eval_args.plot = str(out.with_name(f"{out.stem}-eval.png"))
    result = run_eval(eval_args, {f"toxicity-{args.prompt_set}": prompts})
    if result is None:  # another rank writes (torchrun)
        return None
    text = " ".join(command)
    out.with_suffix(".md").write_text(markdown(result, text))
    plot(result, out.with_suffix(".png"))
    return result
