r"""Scaling of ``fastdia sample`` over processes (``torchrun``, gloo on the CPU).

From the repository root::

    python -m benchmarks.scale_out --ranks 1,2 --prompts 16 \
        --out benchmarks/results/scale_out_cpu.json -- --new-tokens 32

Writes ``--prompts`` prompts (the shipped eval prompts, cycled), then for each world size
runs ``torchrun --nproc-per-node K -m fastdia sample --prompts-file ...`` (one thread per
rank), timing the whole command (start, model loads, sampling, gathering) and reading the
sampling time the summary reports (the slowest rank's). Checks that every world size
writes the same texts as one process. The options after ``--`` go to ``fastdia sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit_result, split_passthrough

PROMPTS = Path(__file__).resolve().parents[1] / "fastdia" / "assets" / "prompts"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    own, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--out", default=None)
    args = p.parse_args(own)
    pool = [
        line
        for name in ("eval-neutral.txt", "eval-negative.txt")
        for line in (PROMPTS / name).read_text().splitlines()
        if line.strip()
    ]
    rows = []
    texts: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(pool[i % len(pool)] for i in range(args.prompts)) + "\n")
        for k in (int(x) for x in args.ranks.split(",")):
            out = Path(tmp) / f"out-{k}.jsonl"
            launch = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node",
                      str(k), "--master-port", str(_port()), "-m", "fastdia"]  # fmt: skip
            cmd = [*launch, "sample", "--prompts-file", str(prompts), "--num-samples",
                   str(args.num_samples), "--out", str(out), *passthrough]  # fmt: skip
            env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            lines = [json.loads(x) for x in out.read_text().splitlines()]
            summary = lines[-1]["summary"]
            texts[k] = [x["text"] for x in lines[:-1]]
            rows.append(
                {
                    "ranks": k,
                    "wall_seconds": round(wall, 2),
                    "sampling_seconds": round(summary["seconds"], 2),
                    "new_tokens": summary["new_tokens_delivered"],
                    "tokens_per_s": round(summary["tokens_per_s"], 1),
                }
            )
            print(rows[-1], file=sys.stderr)
    first = next(iter(texts.values()))
    fields = {
        "what": "fastdia sample over torchrun ranks (gloo, one thread per rank)",
        "prompts": args.prompts,
        "num_samples": args.num_samples,
        "sample_options": passthrough,
        "same_texts_as_one_process": all(t == first for t in texts.values()),
        "rows": rows,
    }
    emit_result("scale_out", [*own, "--", *passthrough], args.out, fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
