"""Exact resume of ``fastdia generate`` under SIGKILL.

From the repository root::

    python -m benchmarks.job_resume --requests 1000 --kills 3 -- --steps 10 --new-tokens 16

Writes ``--requests`` requests (the shipped prompt files, cycled, each with an id), runs
``fastdia generate`` over them once uninterrupted, then again into a second output that is
killed with SIGKILL ``--kills`` times at random points (seeded, spread over the
uninterrupted run's duration; each kill waits until the job has written something new) and
resumed until it finishes. Reports whether the two outputs are identical byte for byte
after sorting the lines by id, with the kill times and the lines written before each kill.
The options after ``--`` go to ``fastdia generate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit_result, split_passthrough

log = logging.getLogger("job_resume")


def _sorted(path: Path) -> list[bytes]:
    return sorted(path.read_bytes().splitlines(), key=lambda line: json.loads(line)["id"])


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    full_argv = list(sys.argv[1:] if argv is None else argv)
    argv, job_args = split_passthrough(full_argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.job_resume", description=__doc__)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="fastdia-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    prompts_dir = Path(__file__).resolve().parent.parent / "fastdia" / "assets" / "prompts"
    prompts = [
        line
        for name in ("eval-neutral.txt", "eval-negative.txt", "tune.txt", "train.txt")
        for line in (prompts_dir / name).read_text().splitlines()
        if line.strip()
    ]
    inp = folder / "requests.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"id": f"req-{i:05d}", "prompt": prompts[i % len(prompts)]}) + "\n"
            for i in range(args.requests)
        )
    )
    cmd = [sys.executable, "-m", "fastdia.cli", "generate", "--input", str(inp), *job_args]
    full, part = folder / "full.jsonl", folder / "part.jsonl"
    for path in (full, part):
        path.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run([*cmd, "--output", str(full)], check=True, stderr=subprocess.DEVNULL)
    uninterrupted = time.perf_counter() - start
    log.info("uninterrupted run: %.1f s", uninterrupted)

    rng = random.Random(args.seed)
    kills = []
    for k in range(args.kills):
        wait = rng.uniform(0.15, 0.85) * uninterrupted / args.kills
        before = _lines(part)
        proc = subprocess.Popen([*cmd, "--output", str(part)], stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        while proc.poll() is None and (time.perf_counter() - t0 < wait or _lines(part) == before):
            time.sleep(0.05)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(
            {
                "after_s": round(time.perf_counter() - t0, 2),
                "killed": not finished,
                "lines_before": before,
                "lines_after": _lines(part),
                "torn_tail": not part.read_bytes().endswith(b"\n") if part.exists() else False,
            }
        )
        log.info("kill %d: %s", k + 1, kills[-1])
    subprocess.run([*cmd, "--output", str(part)], check=True, stderr=subprocess.DEVNULL)
    identical = _sorted(full) == _sorted(part)
    emit_result(
        "job_resume",
        full_argv,
        args.out,
        {
            "requests": args.requests,
            "uninterrupted_seconds": round(uninterrupted, 1),
            "kills": kills,
            "lines": _lines(full),
            "identical_after_sorting_by_id": identical,
        },
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
