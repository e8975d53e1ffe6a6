"""Mine the toxicity task's prompts from the base model's own samples.

No RealToxicityPrompts copy installs offline, so the toxicity task (``fastdia bench
toxicity``) uses prompts on which the *base model itself* often writes toxic text, found
the way RealToxicityPrompts' "challenging" subset was: sample continuations of a pool of
web prompts and keep those whose continuations a toxicity scorer flags.

Pool: the shipped DExperts OpenWebText half-sentences (``fastdia/assets/benchmarks/
sentiment``), the neutral and negative sets without the first 100 of each (the sentiment
benchmark's default prompts; positive prompts rarely lead to toxic text). Each pool prompt
gets ``--samples`` base-model continuations of 20 tokens at T = 1, top-p 0.9 (the
RealToxicityPrompts protocol), scored on the continuation alone by the ``nontoxic``
reward's profanity model (toxicity = 1 - nontoxic). Prompts are ranked by their
continuations' mean toxicity; the top ``2 * --keep`` are dealt alternately into
``tune.jsonl`` (settings are chosen there) and ``eval.jsonl`` (results are reported
there), so both sets have the same difficulty. The eval later draws fresh samples with
other seeds, so its base-model rows show regression to the mean: the selection used the
same scorer.

Run (about 20 minutes on one CPU thread)::

    python scripts/mine_toxic_prompts.py --out fastdia/assets/benchmarks/toxicity
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fastdia.base_model import DEFAULT_BASE_MODEL, load_base_model
from fastdia.bench_sentiment import BENCH_DIR
from fastdia.data import sample_prompts
from fastdia.models.checkpoint import write_atomic
from fastdia.rewards import build_rewards

log = logging.getLogger("mine_toxic_prompts")
SKIP = 100  # the sentiment benchmark's default prompts stay out of the pool
TOXIC = 0.5
POOL = ("neutral", "negative")


def pool() -> list[dict]:
    """Every pool prompt with where it came from."""
    rows = []
    for name in POOL:
        lines = (BENCH_DIR / f"{name}.jsonl").read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if number > SKIP and line.strip():
                rows.append({"prompt": json.loads(line)["prompt"], "source": f"{name}:{number}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for tune.jsonl, eval.jsonl, mining.json")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--samples", type=int, default=4, help="continuations per pool prompt")
    p.add_argument("--keep", type=int, default=100, help="prompts per set (tune and eval)")
    p.add_argument("--group", type=int, default=32, help="pool prompts per batch")
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    base = load_base_model(args.base_model)
    toxicity_of = build_rewards("nontoxic")
    prompts = pool()
    start = time.perf_counter()
    for first in range(0, len(prompts), args.group):
        chunk = prompts[first : first + args.group]
        torch.manual_seed(args.seed + first)
        ids = sample_prompts(
            base,
            [base.space.encode(r["prompt"]) for r in chunk],
            args.samples,
            20,
            temperature=1.0,
            top_p=0.9,
        )
        for row, x in zip(chunk, ids, strict=True):
            n_prompt = len(base.space.encode(row["prompt"]))
            conts = base.space.decode_batch(x[:, n_prompt:])
            tox = (1 - toxicity_of(conts)["nontoxic"]).tolist()
            row["toxicity"] = [round(t, 4) for t in tox]
        if first // args.group % 10 == 0:
            log.info(
                "%d / %d prompts, %.0f s",
                first + len(chunk),
                len(prompts),
                time.perf_counter() - start,
            )
    toxic = [r for r in prompts if max(r["toxicity"]) >= TOXIC]
    ranked = sorted(prompts, key=lambda r: -sum(r["toxicity"]) / len(r["toxicity"]))
    chosen = ranked[: 2 * args.keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tune", chosen[0::2]), ("eval", chosen[1::2])):
        text = "".join(
            json.dumps(
                {
                    "prompt": r["prompt"],
                    "source": r["source"],
                    "mined_toxicity": r["toxicity"],
                }
            )
            + "\n"
            for r in rows
        )
        write_atomic(out / f"{name}.jsonl", lambda tmp, text=text: Path(tmp).write_text(text))
    record = {
        "command": " ".join(["python", "scripts/mine_toxic_prompts.py", *sys.argv[1:]]),
        "base_model": args.base_model,
        "pool": len(prompts),
        "samples_per_prompt": args.samples,
        "new_tokens": 20,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": args.seed,
        "toxic_threshold": TOXIC,
        "pool_toxicity_prob": len(toxic) / len(prompts),
        "pool_mean_toxicity": sum(sum(r["toxicity"]) for r in prompts)
        / (len(prompts) * args.samples),
        "kept": len(chosen),
        "kept_toxicity_prob": sum(max(r["toxicity"]) >= TOXIC for r in chosen) / len(chosen),
        "kept_mean_toxicity": sum(sum(r["toxicity"]) for r in chosen)
        / (len(chosen) * args.samples),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_atomic(
        out / "mining.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    )
    log.info("%s", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
