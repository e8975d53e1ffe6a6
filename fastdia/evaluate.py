"""``fastdia eval``: fastdia's rows beside the baselines, on the same prompts and lengths.

For every prompt set (neutral and negative openers by default, ``fastdia/assets/prompts``)
each *method* writes ``num_samples`` continuations of ``new_tokens`` tokens per prompt
(every method with the same banned tokens: the end-of-text / end-of-turn and template
tokens are masked, so every continuation has its full length); a row reports, over all
prompts of the set:

* ``rewards``: mean and standard deviation of every true reward of the output texts
  (prompt included; with ``score="continuation"``, the continuation alone, as the
  DExperts protocol scores, and so do the sentiment judges), and for ``sentiment`` the
  fraction of positive texts (VADER compound > 0.05);
* ``perplexity``: the base model's perplexity of the generated tokens given the prompt,
  ``exp(mean token NLL)`` over all generated tokens;
* ``distinct_1``/``distinct_2``/``distinct_3``: per prompt, the distinct token n-grams of its
  samples' continuations divided by their count, averaged over prompts (the DExperts
  protocol);
* ``self_bleu``: each continuation's BLEU-4 against the other continuations of its prompt,
  averaged (higher: less diverse; :func:`fastdia.stats.self_bleu`);
* ``degenerate_frac``: the fraction of samples whose continuation is degenerate (fewer
  than 60% of its bigrams distinct, or one token filling more than a quarter of it);
* ``prompt_gap``: the base model's mean NLL per token of a continuation after another
  prompt of the set (the next one, cyclically) minus after its own: how much the
  continuation follows its prompt (0: not at all);
* ``seconds_per_100_tokens``: wall time of writing the samples *and scoring them with the
  true reward* (best-of-N scores N times as many), per 100 generated tokens;
* ``ci``: 95% intervals of the positive rate, perplexity, distinct-2 and degenerate
  fraction (a paired cluster bootstrap over prompts, :mod:`fastdia.stats`), and for every
  fastdia row the rows that dominate it on those intervals (:func:`add_intervals`).

Methods (``fastdia eval --baselines``): the base model's own samples and best-of-N of them
by the true guiding reward, at the decode's temperature with top-p 1 (matched to fastdia's
decode) and at temperature 1, top-p 0.95; the tilt-only decode (fastdia's LM decode with
its per-token critic tilt and no latent: the sampler with latent weight 0 runs no
diffusion, FUDGE / PPLM-BoW style weighted decoding); the pure-noise latent ablation (the
decode reading each block's initial noise instead of the guided latent); plain
critic-weighted decoding at T = 1; and fastdia's sampler, one row per configuration. Every
row uses the same prompts, new-token count and seeds (prompt ``i``'s samples take the
seeds ``seed + 1000 i + j``). Results are written as JSON, a Markdown table and a PNG of
positive rate against perplexity.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdia import stats
from fastdia.base_model import BaseModel
from fastdia.data import sample_prompts
from fastdia.distributed import SINGLE, World
from fastdia.errors import ConfigError
from fastdia.lm_nll import tail_nll
from fastdia.stats import RowSamples, distinct_by_prompt

log = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).resolve().parent / "assets" / "prompts"
PROMPT_SETS = ("neutral", "negative")
POSITIVE = 0.05
DEGENERATE_DISTINCT2 = 0.6  # a sample with fewer distinct bigrams than this is degenerate
DEGENERATE_TOP_TOKEN = 0.25  # ... or one whose most frequent token fills more than this


def prompt_set(name: str) -> list[str]:
    """The prompts of a shipped set (``neutral``, ``negative``) or of a file, one per line."""
    path = PROMPT_DIR / f"eval-{name}.txt" if name in PROMPT_SETS else Path(name)
    if not path.is_file():
        raise ConfigError(
            f"unknown prompt set {name!r}: use {', '.join(PROMPT_SETS)} or a file of prompts, "
            "one per line"
        )
    prompts = [p for p in path.read_text().splitlines() if p.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


@torch.no_grad()
def token_nll(base: BaseModel, ids: torch.Tensor, prompt_len: int) -> tuple[float, int]:
    """Summed base-model NLL of ``ids [B, L]``'s tokens after the first ``prompt_len``.

    Each scored token is conditioned on everything before it; with ``prompt_len == 0`` the
    first token (which has no context) is not scored. Returns ``(sum of NLL, tokens)``.
    """
    model = base.model
    ids = ids.to(model.device)
    logp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    scored = nll[:, max(prompt_len, 1) - 1 :]
    return scored.sum().item(), scored.numel()


def perplexity(base: BaseModel, ids: torch.Tensor, prompt_len: int) -> float:
    """``exp(mean NLL)`` of :func:`token_nll`."""
    total, count = token_nll(base, ids, prompt_len)
    return math.exp(total / count)


def is_degenerate(seq: Sequence[int]) -> bool:
    """Whether a continuation repeats itself (see the module docstring for the rule)."""
    if not seq:
        return False
    bigrams = [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]
    if bigrams and len(set(bigrams)) / len(bigrams) < DEGENERATE_DISTINCT2:
        return True
    return Counter(seq).most_common(1)[0][1] / len(seq) > DEGENERATE_TOP_TOKEN


@torch.no_grad()
def continuation_nll(base: BaseModel, prompt: Sequence[int], cont: torch.Tensor) -> torch.Tensor:
    """Base-model NLL of each token of ``cont [n, m]`` after ``prompt``: ``[n, m]`` float32."""
    model = base.model
    ids = torch.cat([torch.tensor(list(prompt)).expand(cont.shape[0], -1), cont], dim=1)
    return tail_nll(model, ids.to(model.device), cont.shape[1]).cpu()


@dataclass
class Batch:
    """One prompt's samples: ``ids [n, L]`` (prompt included), the prompt's ids and text."""

    ids: torch.Tensor
    prompt: list[int]
    text: str | None = None


@dataclass
class Scored:
    """The model-heavy per-sample values of one prompt's samples (what a rank computes for
    its own prompts under ``torchrun``, so that scoring is shared out like sampling).

    Attributes:
        own: ``[n, m]`` float32, the base model's NLL of each continuation token after its
            prompt.
        other: ``[n, m]`` float32, the same after the next prompt (the prompt gap), or None
            for a single prompt.
        judge_nll: LM judge name -> each sample's ``(summed NLL, tokens)``.
    """

    own: torch.Tensor
    other: torch.Tensor | None
    judge_nll: dict[str, list[tuple[float, int]]]


def score_batch(
    base: BaseModel, batch: Batch, next_prompt: list[int] | None, judges: Sequence[Any] = ()
) -> Scored:
    """:class:`Scored` of one prompt's samples; ``next_prompt``: the ids of the prompt after
    it (cyclically), None when there is one prompt."""
    cont = batch.ids[:, len(batch.prompt) :]
    own = continuation_nll(base, batch.prompt, cont)
    other = None if next_prompt is None else continuation_nll(base, next_prompt, cont)
    text = batch.text if batch.text is not None else base.space.decode(batch.prompt)
    conts = [base.space.decode(row) for row in cont]
    judge_nll = {j.name: j.nll([text] * len(conts), conts) for j in judges if j.kind == "lm"}
    return Scored(own, other, judge_nll)


def summarise(
    base: BaseModel,
    reward: Callable[[list[str]], dict[str, torch.Tensor]],
    batches: list[Batch],
    seconds: float,
    judges: Sequence[Any] = (),
    *,
    score: str = "text",
    scored: Sequence[Scored] | None = None,
) -> tuple[dict[str, Any], RowSamples]:
    """The metrics of a row (see the module docstring); ``seconds`` spent writing and
    scoring the samples (the judges are not counted: a user does not pay for them). Also
    the row's per-sample values, for confidence intervals. ``score``: what the rewards and
    sentiment judges read, ``"text"`` (prompt and continuation) or ``"continuation"``.
    ``scored``: each batch's :func:`score_batch` where the ranks computed them (computed
    here otherwise)."""
    if scored is None:
        nxt = [batches[(i + 1) % len(batches)].prompt for i in range(len(batches))]
        scored = [
            score_batch(base, b, nxt[i] if len(batches) > 1 else None, judges)
            for i, b in enumerate(batches)
        ]
    texts = scored_texts(base, batches, score)
    generated = [row[len(b.prompt) :].tolist() for b in batches for row in b.ids]
    n_tokens = sum(len(g) for g in generated)
    own = [x.own for x in scored]
    nll_own = torch.cat([x.flatten() for x in own])
    degenerate = [is_degenerate(g) for g in generated]
    prompt_of = [i for i, b in enumerate(batches) for _ in range(b.ids.shape[0])]
    groups = [
        [g for g, p in zip(generated, prompt_of, strict=True) if p == i]
        for i in range(len(batches))
    ]
    gap = None
    if len(batches) > 1:
        other = torch.cat([x.other.flatten() for x in scored if x.other is not None])
        gap = (other - nll_own).mean().item()
    values = reward(texts)
    rewards: dict[str, Any] = {}
    for name, v in values.items():
        v = v.double()
        entry = {"mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0}
        if name == "sentiment":
            entry["positive_frac"] = (v > POSITIVE).double().mean().item()
        if name == "nontoxic":
            tox = (1 - v).tolist()
            entry["expected_max_toxicity"] = stats.expected_max_toxicity(tox, prompt_of)
            entry["toxicity_prob"] = stats.toxicity_probability(tox, prompt_of)
        rewards[name] = entry
    row = {
        "num_samples": len(texts),
        "rewards": rewards,
        "perplexity": math.exp(nll_own.double().mean().item()),
        "distinct_1": distinct_by_prompt(prompt_of, generated, 1),
        "distinct_2": distinct_by_prompt(prompt_of, generated, 2),
        "distinct_3": distinct_by_prompt(prompt_of, generated, 3),
        "self_bleu": _nan_to_none(stats.self_bleu(groups)),
        "degenerate_frac": sum(degenerate) / len(generated),
        "prompt_gap": gap,
        "seconds_per_100_tokens": 100 * seconds / n_tokens,
        "examples": [t for b in batches[:4] for t in base.space.decode_batch(b.ids)][:4],
    }
    sentiment = values.get("sentiment")
    positive = None if sentiment is None else (sentiment > POSITIVE).double().tolist()
    nontoxic = values.get("nontoxic")
    toxicity = None if nontoxic is None else (1 - nontoxic.double()).tolist()
    judge_nll = {
        name: [v for x in scored for v in x.judge_nll[name]] for name in scored[0].judge_nll
    }
    judged = judge_row(
        base, judges, batches, texts, positive, degenerate, toxicity, judge_nll=judge_nll
    )
    row["judges"] = judged.pop("row")
    samples = RowSamples.build(
        prompt=prompt_of,
        positive=positive,
        nll=[float(x.double().sum()) for o in own for x in o],
        tokens=[int(x.numel()) for o in own for x in o],
        degenerate=degenerate,
        generated=generated,
        toxicity=toxicity,
        **judged,
    )
    return row, samples


SCORED = ("text", "continuation")


def scored_texts(base: BaseModel, batches: Sequence[Batch], score: str) -> list[str]:
    """What the rewards read of each sample: the whole text, or the continuation alone."""
    if score not in SCORED:
        raise ConfigError(f"score must be one of {', '.join(SCORED)}, got {score!r}")
    if score == "text":
        return [t for b in batches for t in base.space.decode_batch(b.ids)]
    return [t for b in batches for t in base.space.decode_batch(b.ids[:, len(b.prompt) :])]


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def judge_row(
    base: BaseModel,
    judges: Sequence[Any],
    batches: list[Batch],
    texts: list[str],
    positive: list[float] | None,
    degenerate: list[bool],
    toxicity: list[float] | None = None,
    *,
    judge_nll: dict[str, list[tuple[float, int]]] | None = None,
) -> dict[str, Any]:
    """Every judge on a row's samples: ``{"row": {judge: {metric: value}},
    "judge_positive": [n] or None, "judge_scores": [(nll, tokens)] or None,
    "judge_toxic": [n] or None}`` (the first judge of each kind gives the per-sample values
    behind the intervals). ``judge_nll``: LM judges' per-sample ``(NLL, tokens)`` already
    computed (:func:`score_batch`), by judge name.

    A sentiment judge reports its positive rate and, where the reward has one too, the
    reward-hacking rate: samples the reward calls positive and the judge does not, or
    degenerate ones. A toxicity judge reports the share of samples it flags, its toxicity
    probability (prompts with a flagged sample) and, where the row has the reward's
    ``toxicity`` (``[n]``), the reward-hacking rate: samples the reward calls non-toxic
    (toxicity below 0.5) that the judge flags, or degenerate ones.
    """
    from fastdia import judges as jd

    prompts = [
        b.text if b.text is not None else base.space.decode(b.prompt)
        for b in batches
        for _ in range(b.ids.shape[0])
    ]
    conts = [base.space.decode(row[len(b.prompt) :]) for b in batches for row in b.ids]
    prompt_of = [i for i, b in enumerate(batches) for _ in range(b.ids.shape[0])]
    report: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {"judge_positive": None, "judge_scores": None, "judge_toxic": None}
    for judge in judges:
        if judge.kind == "lm":
            known = (judge_nll or {}).get(judge.name)
            scores = known if known is not None else judge.nll(prompts, conts)
            report[judge.name] = {"perplexity": jd.perplexity(scores)}
            if out["judge_scores"] is None:
                out["judge_scores"] = scores
        elif judge.kind == "toxicity":
            flagged = [float(f) for f in judge.toxic(texts)]
            entry = {
                "toxic_frac": sum(flagged) / len(flagged),
                "toxicity_prob": stats.toxicity_probability(flagged, prompt_of),
            }
            if toxicity is not None:
                hacked = [
                    (t < stats.TOXIC and f > 0) or d
                    for t, f, d in zip(toxicity, flagged, degenerate, strict=True)
                ]
                entry["reward_hacking_frac"] = sum(hacked) / len(hacked)
            report[judge.name] = entry
            if out["judge_toxic"] is None:
                out["judge_toxic"] = flagged
        else:
            flags = judge.positive(texts)
            entry = {"positive_frac": sum(flags) / len(flags)}
            if positive is not None:
                hacked = [
                    (p > 0 and not f) or d
                    for p, f, d in zip(positive, flags, degenerate, strict=True)
                ]
                entry["reward_hacking_frac"] = sum(hacked) / len(hacked)
            report[judge.name] = entry
            if out["judge_positive"] is None:
                out["judge_positive"] = [float(f) for f in flags]
    out["row"] = report
    return out


Method = Callable[[Sequence[str], Sequence[int]], tuple[list[torch.Tensor], float]]
"""``method(prompts, seeds) -> (ids, seconds)``: the samples of a group of prompts, written
in one batch; prompt ``i``'s samples take the seeds ``seeds[i] ..`` (the base model's
rows: the group's stream starts at ``seeds[0]``); ``ids[i]`` ``[n, L_i]`` int64 on the CPU,
the prompt included."""


def evaluate_method(
    base: BaseModel,
    method: Method,
    prompts: Sequence[str],
    reward: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    seed: int = 0,
    judges: Sequence[Any] = (),
    score: str = "text",
    group: int = 1,
    world: World = SINGLE,
) -> tuple[dict[str, Any], RowSamples] | None:
    """Run ``method`` on every prompt, ``group`` prompts per batch, and summarise (scoring
    time included): the row's metrics and its per-sample values (:func:`summarise`), judged
    by ``judges``; the rewards read ``score`` (:func:`scored_texts`). Prompt ``i`` takes the
    seed ``seed + 1000 i`` (disjoint per-row seeds across prompts).

    Under ``torchrun`` (``world``) rank ``r`` writes the groups ``r, r + W, ...`` and
    computes their model-heavy scores (:func:`score_batch`: perplexities, the prompt gap,
    the LM judges), and rank 0 gathers them, scores the rewards and summarises (the others
    return None); the seconds are summed over ranks, so seconds per 100 tokens stay what
    one process pays.
    """
    if group < 1:
        raise ConfigError(f"prompts per batch must be >= 1, got {group}")
    done: list[tuple[int, list[Batch], list[Scored]]] = []
    seconds = 0.0
    for first in world.take(range(0, len(prompts), group)):
        chunk = list(prompts[first : first + group])
        seeds = [seed + 1000 * i for i in range(first, first + len(chunk))]
        ids, sec = method(chunk, seeds)
        batches = [Batch(x, base.space.encode(p), p) for x, p in zip(ids, chunk, strict=True)]
        # the model-heavy scoring of this rank's prompts (not timed: like the judges, a
        # user does not pay for the metrics)
        scored = [
            score_batch(
                base,
                b,
                base.space.encode(prompts[(first + k + 1) % len(prompts)])
                if len(prompts) > 1
                else None,
                judges,
            )
            for k, b in enumerate(batches)
        ]
        done.append((first, batches, scored))
        seconds += sec
    shares = world.gather((done, seconds))
    if shares is None:
        return None
    groups = sorted((g for part, _ in shares for g in part), key=lambda g: g[0])
    batches = [b for _, chunk, _ in groups for b in chunk]
    scored = [x for _, _, part in groups for x in part]
    seconds = sum(sec for _, sec in shares)
    start = time.perf_counter()
    values = reward(scored_texts(base, batches, score))
    seconds += time.perf_counter() - start  # what a user pays to score the samples
    return summarise(
        base, lambda texts: values, batches, seconds, judges, score=score, scored=scored
    )


def add_intervals(
    rows: list[dict[str, Any]], samples: list[RowSamples], *, draws: int, seed: int = 0
) -> None:
    """Add to every row of a prompt set its 95% intervals (``row["ci"]``: metric ->
    ``[lo, hi]``, a paired cluster bootstrap over prompts, :mod:`fastdia.stats`), and to
    every fastdia row the rows that dominate it on those intervals (``dominated_by``),
    to every other row the fastdia rows it dominates (``dominates``)."""
    prompts = max(s.prompts for s in samples)
    picks = stats.resample_prompts(prompts, draws, seed)
    reps = [stats.replicates(s, picks) for s in samples]
    for row, rep in zip(rows, reps, strict=True):
        row["ci"] = stats.intervals(rep)
        row["ci_draws"] = draws
    for i, row in enumerate(rows):
        if row["kind"] != "fastdia":
            continue
        row["dominated_by"] = []
        for j, other in enumerate(rows):
            if j == i:
                continue
            if stats.dominates(
                reps[j],
                reps[i],
                other["seconds_per_100_tokens"],
                row["seconds_per_100_tokens"],
            ):
                row["dominated_by"].append(other["name"])
                other.setdefault("dominates", []).append(row["name"])


def base_model_method(
    base: BaseModel,
    num_samples: int,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 0.95,
    suppress: Sequence[int] = (),
) -> Method:
    """The base model's own samples at ``temperature`` and ``top_p``, the ``suppress`` ids
    never drawn."""

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(seeds[0])
        start = time.perf_counter()
        ids = sample_prompts(
            base,
            [base.space.encode(p) for p in prompts],
            num_samples,
            new_tokens,
            temperature=temperature,
            top_p=top_p,
            suppress=suppress,
        )
        return ids, time.perf_counter() - start

    return run


def best_of_n_method(
    base: BaseModel,
    num_samples: int,
    new_tokens: int,
    n: int,
    score: Callable[[list[str]], torch.Tensor],
    *,
    temperature: float = 1.0,
    top_p: float = 0.95,
    suppress: Sequence[int] = (),
) -> Method:
    """Best of ``n`` base-model samples (``temperature``, ``top_p``) by ``score`` (the
    true reward), per output sample.

    The time includes writing all ``n * num_samples`` samples of every prompt and scoring
    them.
    """

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(seeds[0])
        start = time.perf_counter()
        drawn = sample_prompts(
            base,
            [base.space.encode(p) for p in prompts],
            n * num_samples,
            new_tokens,
            temperature=temperature,
            top_p=top_p,
            suppress=suppress,
        )
        values = score([t for ids in drawn for t in base.space.decode_batch(ids)])
        values = values.view(len(prompts), num_samples, n)
        best = values.argmax(dim=2) + torch.arange(num_samples) * n  # [prompts, samples]
        picked = [ids[b] for ids, b in zip(drawn, best, strict=True)]
        return picked, time.perf_counter() - start

    return run


def sampler_method(sampler: Any, num_samples: int, new_tokens: int) -> Method:
    """fastdia's sampler (one plan per batch shape, reused across groups): prompt ``i``'s
    samples take the seeds ``seeds[i] .. seeds[i] + num_samples - 1``, so its texts do not
    depend on the group it runs in."""

    def run(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[torch.Tensor], float]:
        rows = [p for p in prompts for _ in range(num_samples)]
        row_seeds = [s + j for s in seeds for j in range(num_samples)]
        out = sampler.sample(len(rows), new_tokens, prompt=rows, seed=row_seeds)
        if out.mh is not None:
            log.info(
                "MALA rows: %.1f%% of %d proposed moves accepted",
                100 * out.mh_acceptance,
                sum(out.mh["proposed"]),
            )
        ids = []
        for i in range(len(prompts)):
            rows_i = slice(i * num_samples, (i + 1) * num_samples)
            prompt_i = torch.tensor(out.prompt_ids[rows_i.start], dtype=torch.int64)
            ids.append(torch.cat([prompt_i.expand(num_samples, -1), out.tokens[rows_i]], dim=1))
        return ids, out.seconds

    return run


def format_or_na(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ci(row: dict[str, Any], metric: str, fmt: str) -> str:
    lo_hi = row.get("ci", {}).get(metric)
    return "" if lo_hi is None else f" [{format(lo_hi[0], fmt)}, {format(lo_hi[1], fmt)}]"


def markdown_table(result: dict[str, Any], reward_name: str) -> str:
    """The rows of every prompt set as one Markdown table (what the model card shows), with
    95% bootstrap intervals, then which rows dominate which fastdia rows."""
    rows_all = [r for rows in result["sets"].values() for r in rows]
    lm_judge = next(
        (n for r in rows_all for n, v in r.get("judges", {}).items() if "perplexity" in v), None
    )
    sent_judge = next(
        (n for r in rows_all for n, v in r.get("judges", {}).items() if "positive_frac" in v), None
    )
    extra_head = (f" | positive ({sent_judge}) | hacking" if sent_judge else "") + (
        f" | perplexity ({lm_judge})" if lm_judge else ""
    )
    columns = 10 + (2 if sent_judge else 0) + (1 if lm_judge else 0)
    head = (
        f"| prompts | row | positive | {reward_name} | perplexity | distinct-2 | self-BLEU "
        f"| degenerate | prompt gap | s / 100 tok{extra_head} |\n|" + "---|" * columns + "\n"
    )
    lines, notes = [], []
    for set_name, rows in result["sets"].items():
        for row in rows:
            entry = row["rewards"][reward_name]
            pos = entry.get("positive_frac")
            gap = row["prompt_gap"]
            positive = "n/a" if pos is None else f"{pos:.0%}" + _ci(row, "positive_frac", ".0%")
            extra = ""
            if sent_judge:
                judged = row.get("judges", {}).get(sent_judge, {})
                hack = judged.get("reward_hacking_frac")
                extra += (
                    f" | {judged['positive_frac']:.0%}{_ci(row, 'judge_positive_frac', '.0%')}"
                    if judged
                    else " | n/a"
                ) + (f" | {hack:.0%}" if hack is not None else " | n/a")
            if lm_judge:
                ppl = row.get("judges", {}).get(lm_judge, {}).get("perplexity")
                extra += f" | {ppl:.1f}{_ci(row, 'judge_perplexity', '.1f')}" if ppl else " | n/a"
            lines.append(
                f"| {set_name} | {row['name']} | {positive} | {entry['mean']:+.3f} | "
                f"{row['perplexity']:.1f}{_ci(row, 'perplexity', '.1f')} | "
                f"{row['distinct_2']:.2f}{_ci(row, 'distinct_2', '.2f')} | "
                f"{format_or_na(row.get('self_bleu'), '.2f')} | "
                f"{row['degenerate_frac']:.0%} | {'n/a' if gap is None else f'{gap:.2f}'} | "
                f"{row['seconds_per_100_tokens']:.2f}{extra} |"
            )
            if "dominated_by" in row:
                by = ", ".join(row["dominated_by"]) or "no row"
                notes.append(f"- {set_name}: **{row['name']}** is dominated by {by}")
    table = head + "\n".join(lines) + "\n"
    if notes:
        table += (
            "\nDominance (not significantly worse on positive rate, perplexity, distinct-2 "
            "and degenerate fraction, under the reward and the base model and under the "
            "judges, 95% paired bootstrap over prompts, nor slower; better on one):\n\n"
            + "\n".join(notes)
            + "\n"
        )
    return table


def _err(value: float, lo_hi: list[float] | None) -> list[list[float]] | None:
    """An interval as matplotlib's asymmetric error ``[[below], [above]]``."""
    if lo_hi is None:
        return None
    return [[max(value - lo_hi[0], 0.0)], [max(lo_hi[1] - value, 0.0)]]


def trade_off_lines(ax: Any, rows: Sequence[dict[str, Any]], y_of: Callable[..., Any]) -> None:
    """Join the rows of one family (``row["family"]``: fastdia over lambda, the tilt-only
    decode over its tilt, best-of-N over N) in order of ``row["strength"]`` on ``ax``:
    perplexity on x, ``y_of(row)`` on y (rows where it is None are left out)."""
    families: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        y = y_of(row) if row.get("strength") is not None else None
        if y is not None:
            families.setdefault(row["family"], []).append((row["strength"], row["perplexity"], y))
    for family, points in families.items():
        if len(points) > 1:
            points.sort()
            ax.plot([p[1] for p in points], [p[2] for p in points], "-", alpha=0.5)
            ax.annotate(
                family,
                points[-1][1:],
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
                style="italic",
            )


def plot(result: dict[str, Any], path: str | Path, reward_name: str) -> None:
    """Positive rate (or mean reward) against perplexity, one panel per prompt set; the
    rows of one family (``row["family"]``: fastdia over lambda, the tilt-only decode over
    its tilt, best-of-N over N) joined by a line in order of strength: the trade-off
    curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], sets.items(), strict=True):
        for row in rows:
            entry = row["rewards"][reward_name]
            y = entry.get("positive_frac", entry["mean"])
            kind = row.get("kind", "fastdia")
            marker, color = {
                "baseline": ("s", "tab:green"),
                "ablation": ("^", "tab:gray"),
                "fastdia": ("o", "tab:blue"),
            }[kind]
            ci = row.get("ci", {})
            xerr = _err(row["perplexity"], ci.get("perplexity"))
            yerr = _err(y, ci.get("positive_frac")) if "positive_frac" in entry else None
            ax.errorbar(
                [row["perplexity"]], [y], xerr=xerr, yerr=yerr, fmt=marker, color=color, ms=7
            )
            ax.annotate(
                row["name"],
                (row["perplexity"], y),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )

        def reward_y(row: dict[str, Any]) -> float:
            entry = row["rewards"][reward_name]
            return entry.get("positive_frac", entry["mean"])

        trade_off_lines(ax, rows, reward_y)
        ax.set_xscale("log")
        ax.set_xlabel("base-model perplexity of the continuation (log scale)")
        label = "positive fraction" if reward_name == "sentiment" else f"mean {reward_name}"
        ax.set_ylabel(f"{label} (true reward)")
        ax.set_title(f"{name} (squares: baselines, circles: fastdia; 95% intervals)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
