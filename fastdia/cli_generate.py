"""``fastdia generate``: a resumable batch job over a JSONL file of requests
(:mod:`fastdia.jobs`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fastdia.errors import FastdiaError

log = logging.getLogger(__name__)

MAX_LISTED = 5  # bad lines named in the error message


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where the models come from, and where they run (``generate`` and ``serve``)."""
    from fastdia.base_model import DEFAULT_BASE_MODEL
    from fastdia.cli_options import add_sampling_options, guidance_value
    from fastdia.ops.registry import known_backends

    p.add_argument(
        "--guidance",
        type=guidance_value,
        default=None,
        help="guidance lambda of rows that give none (default: the checkpoint's "
        "sampling.json, else 1)",
    )
    add_sampling_options(p)
    p.add_argument(
        "--checkpoint", default=None, help="folder with denoiser.* and critic-*.* (default: demo)"
    )
    p.add_argument(
        "--base-model", default=DEFAULT_BASE_MODEL, help="the embedded default, a folder"
    )
    p.add_argument("--random-init", action="store_true", help="untrained denoiser and critics")
    p.add_argument("--backend", default=None, help=f"one of: {', '.join(known_backends())}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def generator_from_args(args: argparse.Namespace, *, reward: str) -> Any:
    """A :class:`fastdia.generate.Generator` from :func:`add_model_options`' options, with
    ``reward`` its default."""
    from fastdia.cli_options import sampling_overrides
    from fastdia.generate import Generator

    settings = {k: v for k, v in sampling_overrides(args).items() if v is not None}
    return Generator(
        base_model=args.base_model,
        checkpoint=args.checkpoint,
        random_init=args.random_init,
        reward=reward,
        device=args.device,
        backend=args.backend,
        settings=settings,
    )


def add_parser(sub: Any) -> None:
    """Register the ``generate`` subcommand."""
    from fastdia.cli_options import positive_int
    from fastdia.generate import DEFAULT_NEW_TOKENS, DEFAULT_REWARD

    p = sub.add_parser(
        "generate",
        help="a resumable batch job: JSONL requests in, JSONL samples out",
        description="A resumable batch job over a JSONL file of requests: run the same "
        "command again after a crash and it resumes where the output stops.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="JSONL, one request per line: 'id', 'prompt' and optionally 'reward', "
        "'guidance', 'new_tokens', 'seed', 'chat'",
    )
    p.add_argument(
        "--output",
        required=True,
        help="JSONL samples, appended per finished batch; if it exists the job resumes",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="write bad lines to --errors and go on (default: fail before any sampling)",
    )
    p.add_argument(
        "--errors", default=None, help="--skip-bad: where bad lines go (default: OUTPUT.errors)"
    )
    p.add_argument("--reward", default=DEFAULT_REWARD, help="default reward spec")
    p.add_argument(
        "--new-tokens", type=positive_int, default=DEFAULT_NEW_TOKENS, help="default new tokens"
    )
    p.add_argument("--chat", action="store_true", help="default: wrap prompts as chat turns")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="a request without 'seed' uses this plus a CRC-32 of its id",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="rows per batch (one plan size)"
    )
    add_model_options(p)
    p.set_defaults(func=cmd_generate)


def _bad_message(bad: list[Any], path: str) -> str:
    named = "; ".join(f"line {b.line}: {b.error}" for b in bad[:MAX_LISTED])
    more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    return (
        f"{len(bad)} bad line(s) in {path}: {named}{more}; fix them, or pass --skip-bad to "
        "write them to an errors file and go on"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Validate every line, load once, sample the missing ids, append batch by batch."""
    from tqdm import tqdm

    from fastdia import distributed as dist
    from fastdia.device import default_device
    from fastdia.jobs import JobDefaults, check_requests, read_requests, run_job
    from fastdia.models.checkpoint import write_atomic
    from fastdia.run_checks import check_seed

    check_seed(args.seed)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else output.with_name(output.name + ".errors")
    if output.resolve() == Path(args.input).resolve():
        raise FastdiaError("--output is the --input file; pass another --output")
    if output.is_dir():
        raise FastdiaError(f"--output {output} is a folder; pass a file path")
    # a line without 'guidance' runs with the generator's (--guidance, else sampling.json)
    defaults = JobDefaults(args.reward, None, args.new_tokens, args.chat, args.seed)
    requests, bad = read_requests(args.input, defaults)
    if bad and not args.skip_bad:
        raise FastdiaError(_bad_message(bad, args.input))

    device = default_device(args.device)
    w = dist.world(device)  # under torchrun: this rank's share of the batches
    args.device = dist.rank_device(device, w)
    generator = generator_from_args(args, reward=args.reward)  # bad job settings fail here
    requests, late = check_requests(generator, requests)
    bad = sorted(bad + late, key=lambda b: b.line)
    if late and not args.skip_bad:
        raise FastdiaError(_bad_message(bad, args.input))
    if args.skip_bad and w.is_main:
        text = "".join(b.to_json() + "\n" for b in bad)
        write_atomic(errors, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if bad:
            log.warning("%d bad line(s) written to %s", len(bad), errors)

    bar = None
    counted = [0, 0.0]  # tokens, seconds

    def start(todo: int) -> None:
        nonlocal bar
        bar = tqdm(
            total=todo, unit="req", file=sys.stderr, dynamic_ncols=True, disable=not w.is_main
        )

    def progress(rows: int, new_tokens: int, seconds: float) -> None:
        counted[0] += new_tokens
        counted[1] += seconds
        bar.update(rows)
        bar.set_postfix(tok_s=f"{counted[0] / max(counted[1], 1e-9):.1f}")

    report = run_job(
        generator,
        requests,
        output,
        batch_size=args.batch_size,
        on_start=start,
        on_batch=progress,
        world=w,
    )
    if bar is not None:
        bar.close()
    shares = w.gather((report.written, report.new_tokens, report.seconds))
    dist.finish()
    if shares is None:  # ranks other than 0 are done
        return 0
    report.written = sum(n for n, _, _ in shares)
    report.new_tokens = sum(t for _, t, _ in shares)
    report.seconds = max(s for _, _, s in shares)  # the ranks run side by side
    summary = {
        "requests": report.requests,
        "bad_lines": len(bad),
        "already_done": report.already_done,
        "written": report.written,
        "new_tokens": report.new_tokens,
        "seconds": round(report.seconds, 3),
        "tokens_per_s": round(report.new_tokens / report.seconds, 2) if report.seconds else 0.0,
        "output": str(output),
        "errors": str(errors) if args.skip_bad else None,
        "world_size": w.size,
    }
    print(json.dumps({"summary": summary}), file=sys.stderr)
    return 0
