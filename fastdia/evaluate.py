"""``fastdia eval``: reward, fluency and diversity of guided samples over guidance strengths.

For every prompt and every ``lambda`` the sampler draws ``num_samples`` sequences; each row
of the result reports, over all prompts:

* ``rewards``: mean and standard deviation of every true reward of the output texts, and
  for ``sentiment`` the fraction of positive texts (VADER compound > 0.05);
* ``perplexity``: the base model's perplexity of the generated tokens given the prompt,
  ``exp(mean token NLL)`` over all generated tokens;
* ``distinct_1``/``distinct_2``: distinct token uni-/bigrams over all generated tokens
  divided by their count;
* ``seconds_per_100_tokens``: sampling wall time per 100 generated tokens.

The same metrics for the base model's own samples (temperature 1, top-p 0.95, the training
data's settings) form the reference row. Results are written as JSON and drawn as a PNG of
reward against perplexity, one point per lambda.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdia.base_model import BaseModel
from fastdia.data import DEFAULT_PROMPTS, sample_continuations

log = logging.getLogger(__name__)

DEFAULT_EVAL_PROMPTS = DEFAULT_PROMPTS[:8]  # neutral openers: "The movie was", "I think", ...
POSITIVE = 0.05


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all ``sequences`` divided by the number of n-grams (0 if none)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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


def _summarise(
    base: BaseModel,
    reward: Any,
    batches: list[tuple[torch.Tensor, int]],
    texts: list[str],
    seconds: float,
) -> dict[str, Any]:
    generated = [row[p:].tolist() for ids, p in batches for row in ids]
    n_tokens = sum(len(g) for g in generated)
    nll = [token_nll(base, ids, p) for ids, p in batches]
    values = reward(texts)
    rewards: dict[str, Any] = {}
    for name, v in values.items():
        v = v.double()
        entry = {"mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0}
        if name == "sentiment":
            entry["positive_frac"] = (v > POSITIVE).double().mean().item()
        rewards[name] = entry
    return {
        "num_samples": len(texts),
        "rewards": rewards,
        "perplexity": math.exp(sum(t for t, _ in nll) / sum(c for _, c in nll)),
        "distinct_1": distinct_n(generated, 1),
        "distinct_2": distinct_n(generated, 2),
        "seconds_per_100_tokens": 100 * seconds / n_tokens,
        "examples": texts[:3],
    }


@torch.no_grad()
def base_model_row(
    base: BaseModel,
    prompts: Sequence[str],
    num_samples: int,
    length: int,
    reward: Any,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of the base model's own samples (the reference row)."""
    batches, texts, seconds = [], [], 0.0
    torch.manual_seed(seed)
    for prompt in prompts:
        p_ids = base.space.encode(prompt)
        start = time.perf_counter()
        out = sample_continuations(base, p_ids, num_samples, length)
        seconds += time.perf_counter() - start
        batches.append((out, len(p_ids)))
        texts.extend(base.space.decode_batch(out))
    return {"name": "base model", **_summarise(base, reward, batches, texts, seconds)}


def guided_rows(
    base: BaseModel,
    make_sampler: Any,
    lambdas: Sequence[float],
    prompts: Sequence[str],
    num_samples: int,
    length: int,
    reward: Any,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per ``lambda``; ``make_sampler(lam)`` returns a :class:`~fastdia.Sampler`."""
    rows = []
    for lam in lambdas:
        plan = make_sampler(lam).plan(num_samples, length)
        batches, texts, seconds = [], [], 0.0
        for i, prompt in enumerate(prompts):
            out = plan.run(prompt, seed=seed + i)
            seconds += out.seconds
            batches.append((out.token_ids, plan.prompt_len))
            texts.extend(out.texts)
        row = {
            "name": f"lambda={lam:g}",
            "lambda": lam,
            **_summarise(base, reward, batches, texts, seconds),
        }
        log.info("%s: %s", row["name"], {k: row[k] for k in ("perplexity", "distinct_1")})
        rows.append(row)
    return rows


def plot(result: dict[str, Any], path: str | Path, reward_name: str) -> None:
    """Reward against perplexity, one point per lambda, the base model and lambda 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    guided = [r for r in result["rows"] if "lambda" in r]
    xs = [r["perplexity"] for r in guided]
    ys = [r["rewards"][reward_name]["mean"] for r in guided]
    ax.plot(xs, ys, "o-", color="tab:blue", label="fastdia (one point per lambda)")
    for r, x, y in zip(guided, xs, ys, strict=True):
        ax.annotate(f"λ={r['lambda']:g}", (x, y), textcoords="offset points", xytext=(5, 5))
    unguided = [r for r in guided if r["lambda"] == 0]
    if unguided:
        ax.plot(
            [unguided[0]["perplexity"]],
            [unguided[0]["rewards"][reward_name]["mean"]],
            "s",
            ms=11,
            mfc="none",
            color="tab:red",
            label="unguided (λ=0)",
        )
    for r in result["rows"]:
        if r.get("name") == "base model":
            ax.plot(
                [r["perplexity"]],
                [r["rewards"][reward_name]["mean"]],
                "*",
                ms=14,
                color="tab:green",
                label="base model samples",
            )
    ax.set_xscale("log")
    ax.set_xlabel("base-model perplexity of the output (log scale)")
    ax.set_ylabel(f"mean true reward: {reward_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
