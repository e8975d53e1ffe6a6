"""``fastdia bench sentiment``: the DExperts sentiment-steering benchmark.

The OpenWebText half-sentence prompts of DExperts (Liu et al., ACL 2021), shipped in
``fastdia/assets/benchmarks/sentiment`` with their attribution and license: neutral and
negative prompts are steered toward positive (guide ``sentiment``), neutral and positive
prompts toward negative (guide ``sentiment:-1``); 20 new tokens by default; the reward
and the sentiment judges read the continuation alone, as the field scores. Each of the
four (direction, prompt set) tasks is one ``fastdia eval`` run (:func:`fastdia.cli_eval.
run_eval`) over the first ``--num-prompts`` prompts of the set, with every method row the
eval has (fastdia's default and variants, the matched baselines), its judges and
confidence intervals. The result merges them: JSON, a Markdown table per direction and a
PNG of positive rate against perplexity; the published rows (:data:`PUBLISHED`: another
base model and other judges) are printed apart, labelled with both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parent / "assets" / "benchmarks" / "sentiment"
SETS = ("neutral", "negative", "positive")
TASKS: tuple[tuple[str, str], ...] = (
    ("positive", "neutral"),
    ("positive", "negative"),
    ("negative", "neutral"),
    ("negative", "positive"),
)
"""(direction, prompt set): the benchmark's four steering tasks."""
GUIDES = {"positive": "sentiment", "negative": "sentiment:-1"}
"""Each direction's guide (the reward fastdia steers by)."""
NEW_TOKENS = 20

PUBLISHED_SOURCE = (
    "DExperts (Liu et al., ACL 2021), reprinted in LM-Steer (Han et al., ACL 2024) table 2: "
    "base model GPT-2 large, 25 samples of 20 tokens per prompt, nucleus p = 0.9; positive "
    "rate by a DistilBERT SST-2 classifier, perplexity under GPT-2 XL; 5,000 neutral and "
    "2,500 negative prompts (toward positive)"
)
_PUBLISHED_TABLE = (
    # method, % positive from neutral, from negative prompts, perplexity, dist-3
    ("GPT-2 large, no control", 50.02, 0.00, 29.28, 0.84),
    ("PPLM", 52.68, 8.72, 142.11, 0.85),
    ("DAPT", 77.24, 14.17, 30.52, 0.84),
    ("GeDi", 86.01, 26.80, 58.41, 0.79),
    ("DExperts", 94.46, 36.42, 45.83, 0.83),
    ("LM-Steer", 90.70, 41.23, 41.20, 0.83),
)
PUBLISHED: tuple[dict[str, Any], ...] = tuple(
    dict(zip(("method", "neutral", "negative", "ppl", "dist3"), row, strict=True))
    for row in _PUBLISHED_TABLE
)
"""The published toward-positive rows (% positive continuations), apart from ours."""


def load_prompts(
    name: str, count: int, folder: Path = BENCH_DIR, sets: Sequence[str] = SETS
) -> list[str]:
    """The first ``count`` prompts of the shipped set ``name`` of a benchmark (``folder``
    holds one ``NAME.jsonl`` per set of ``sets``; default: this benchmark's ``neutral``,
    ``negative``, ``positive``), one JSON object with a ``"prompt"`` per line.

    Raises:
        ConfigError: an unknown set, a missing or malformed file, or ``count`` outside
            ``[1, size of the set]``.
    """
    if name not in sets:
        raise ConfigError(f"unknown benchmark set {name!r}; known: {', '.join(sets)}")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"the benchmark set {path} is missing: reinstall fastdia (it ships with the package)"
        )
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(
                f'{path} line {number} is not a JSON object with a "prompt"; the file is '
                "malformed: reinstall fastdia"
            ) from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{path} line {number}: the prompt must be non-empty text")
        prompts.append(prompt)
    if not 1 <= count <= len(prompts):
        raise ConfigError(
            f"--num-prompts must be between 1 and {len(prompts)} (the {name} set), got {count}"
        )
    return prompts[:count]


def task_name(direction: str, prompt_set: str) -> str:
    """``"neutral->positive"``: a task's name in the result."""
    return f"{prompt_set}->{direction}"


def merge(runs: dict[str, dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """One result from the per-direction eval results ``runs`` (direction -> eval JSON):
    ``{"config", "tasks": {task: rows}, "published": {...}}``."""
    tasks = {}
    for direction, result in runs.items():
        for prompt_set, rows in result["sets"].items():
            tasks[task_name(direction, prompt_set)] = rows
    return {
        "config": config,
        "tasks": tasks,
        "published": {"source": PUBLISHED_SOURCE, "rows": list(PUBLISHED)},
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _judged(row: dict[str, Any], kind: str) -> float | None:
    """The first judge's ``kind`` value of a row (``positive_frac`` or ``perplexity``)."""
    for values in row.get("judges", {}).values():
        if kind in values:
            return values[kind]
    return None


def markdown(result: dict[str, Any]) -> str:
    """The benchmark's tables: ours per task, then the published rows apart."""
    cfg = result["config"]
    lines = [
        "# fastdia on the DExperts sentiment benchmark",
        "",
        f"{cfg['num_prompts']} prompts per set, {cfg['samples_per_prompt']} samples each, "
        f"{cfg['new_tokens']} new tokens; base model {cfg['base_model']}; the reward (VADER) "
        "and the sentiment judge read the continuation alone; perplexity of the "
        "continuation under the base model and under the judge LM. Toward negative, lower "
        "positive rates are better.",
        "",
        f"Command: `{cfg['command']}`",
        "",
    ]
    header = (
        "| task | method | % positive (VADER) | % positive (judge) | ppl (base) | "
        "ppl (judge LM) | dist-1 | dist-2 | dist-3 | degenerate | s / 100 tok |"
    )
    lines += [header, "| " + " | ".join(["---"] * 11) + " |"]
    for task, rows in result["tasks"].items():
        for row in rows:
            sentiment = row["rewards"].get("sentiment", {})
            judge_ppl = _judged(row, "perplexity")
            lines.append(
                f"| {task} | {row['name']} | {_pct(sentiment.get('positive_frac'))} | "
                f"{_pct(_judged(row, 'positive_frac'))} | {row['perplexity']:.1f} | "
                f"{'n/a' if judge_ppl is None else f'{judge_ppl:.1f}'} | "
                f"{row['distinct_1']:.2f} | {row['distinct_2']:.2f} | "
                f"{row.get('distinct_3', float('nan')):.2f} | "
                f"{100 * row['degenerate_frac']:.0f}% | {row['seconds_per_100_tokens']:.2f} |"
            )
    lines += [
        "",
        "## Published rows (another base model, other judges: a reference, not a like-for-like "
        "comparison)",
        "",
        result["published"]["source"] + ".",
        "",
        "| method | neutral -> positive, % positive | negative -> positive, % positive | "
        "perplexity | dist-3 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["published"]["rows"]:
        lines.append(
            f"| {row['method']} | {row['neutral']:.2f} | {row['negative']:.2f} | "
            f"{row['ppl']:.2f} | {row['dist3']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Positive rate (VADER) against base-model perplexity, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tasks, strict=True):
        for row in rows:
            pos = row["rewards"].get("sentiment", {}).get("positive_frac")
            if pos is None:
                continue
            ax.scatter(row["perplexity"], 100 * pos, s=30)
            ax.annotate(row["name"][:28], (row["perplexity"], 100 * pos), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (base model)")
        ax.set_ylabel("% positive (VADER)")
        ax.set_title(task, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_directions(text: str) -> list[str]:
    """The ``--directions`` list (``positive``, ``negative`` or both, in the given order)."""
    directions = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in directions if d not in GUIDES]
    if unknown or not directions or len(set(directions)) != len(directions):
        raise ConfigError(
            f"--directions {text!r}: give positive, negative or both, comma-separated, "
            f"each once (unknown: {', '.join(unknown) or 'none'})"
        )
    return directions


def task_outputs(out: Path, direction: str) -> Path:
    """Where one direction's eval run writes its JSON (its table and plot beside it)."""
    return out.with_name(f"{out.stem}-to-{direction}.json")


def run(args: Any, eval_args: Any, command: Sequence[str]) -> dict[str, Any] | None:
    """Run the benchmark: one eval per direction over its two prompt sets (``eval_args``:
    the eval's options, completed here per direction), then the merged JSON, Markdown and
    PNG at ``args.out`` (written by rank 0 under ``torchrun``; the others return None)."""
    from fastdia.cli_eval import run_eval

    out = Path(args.out)
    directions = parse_directions(args.directions)  # checks first
    prompts = {name: load_prompts(name, args.num_prompts) for name in SETS}
    runs = {}
    for direction in directions:
        sets = {s: prompts[s] for d, s in TASKS if d == direction}
        eval_args.guide = GUIDES[direction]
        eval_args.out = str(task_outputs(out, direction))
        eval_args.plot = None
        result = run_eval(eval_args, sets)
        if result is not None:  # rank 0 (under torchrun) or the one process
            runs[direction] = result
    if not runs:
        return None
    config = {
        "num_prompts": args.num_prompts,
        "samples_per_prompt": args.samples_per_prompt,
        "new_tokens": eval_args.new_tokens,
        "base_model": eval_args.base_model,
        "directions": directions,
        "checkpoint": runs[directions[0]]["config"]["checkpoint"],
        "command": " ".join(command),
    }
    result = merge(runs, config)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    return result
