"""The ``fastdia`` command line.

``fastdia sample`` draws guided samples. Every argument is checked before anything heavy
is loaded; errors print one line naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastdia.cli_options import (
    add_sampling_options,
    guidance_value,
    positive_int,
    sampling_overrides,
)
from fastdia.device import default_device
from fastdia.errors import FastdiaError
from fastdia.generate import DEFAULT_NEW_TOKENS, DEFAULT_REWARD

if TYPE_CHECKING:
    from fastdia.prompts import PromptRecord

log = logging.getLogger("fastdia")


def _add_sample_parser(sub: Any) -> None:
    from fastdia.base_model import DEFAULT_BASE_MODEL
    from fastdia.embedding import ROUNDINGS
    from fastdia.ops.registry import known_backends

    p = sub.add_parser("sample", help="draw reward-guided samples")
    p.add_argument("--prompt", default=None, help="text every sample starts with")
    p.add_argument(
        "--prompts-file",
        default=None,
        help="many prompts, one text per line or JSONL objects with 'prompt' (and "
        "optionally 'id', 'seed'): each gets --num-samples samples, in batches of "
        "--batch-size rows, written as JSONL",
    )
    p.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help=f"tokens to generate after the prompt (default {DEFAULT_NEW_TOKENS})",
    )
    p.add_argument(
        "--length",
        type=positive_int,
        default=None,
        help="deprecated: tokens per sample with the prompt included; use --new-tokens",
    )
    p.add_argument(
        "--num-samples", type=positive_int, default=4, help="samples per prompt (the batch size)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="--prompts-file: rows per batch (different prompts share a batch)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user turn in the tokenizer's chat template; the sample "
        "(and what the reward reads) is the assistant's reply",
    )
    p.add_argument(
        "--reward",
        default=DEFAULT_REWARD,
        help="NAME[:ARG][:WEIGHT],... e.g. 'sentiment:1,nontoxic:0.5'",
    )
    p.add_argument(
        "--guidance",
        type=guidance_value,
        default=None,
        help="guidance strength lambda (0: unguided; default: the checkpoint's "
        "sampling.json, else 1)",
    )
    add_sampling_options(p)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed in [0, 2**31): sample i of a prompt uses seed + i",
    )
    p.add_argument(
        "--backend",
        default=None,
        help=f"op variant, one of: {', '.join(known_backends())} "
        "(default: $FASTDIA_BACKEND, else auto)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder with denoiser.* and critic-*.* (default: the shipped demo)",
    )
    p.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        help="the embedded default, a model folder or a cached Hugging Face id",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use untrained denoiser and critics (to try the whole path)",
    )
    p.add_argument("--rounding", default="l2", help=f"one of: {', '.join(ROUNDINGS)}")
    p.add_argument(
        "--clamp-from",
        type=positive_int,
        default=None,
        help="clamp the x0 estimate to the nearest embedding from this step on",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, then a summary")
    p.add_argument(
        "--out", default=None, help="write the JSON lines to this file instead of stdout"
    )
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdia", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(sub)
    from fastdia import cli_bench, cli_eval, cli_generate, cli_profile, cli_serve, cli_train

    cli_generate.add_parser(sub)
    cli_serve.add_parser(sub)
    cli_train.add_parsers(sub)
    cli_eval.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_profile.add_parser(sub)
    return parser


def _requests(args: argparse.Namespace) -> list[PromptRecord]:
    """The prompts of a run: ``--prompts-file``'s, or ``--prompt`` (or none) as one."""
    from fastdia.prompts import PromptRecord, read_prompts_file

    if args.prompts_file is not None:
        if args.prompt is not None:
            raise FastdiaError("give --prompt or --prompts-file, not both")
        return read_prompts_file(args.prompts_file)
    if args.prompt is not None and not args.prompt.strip():
        raise FastdiaError("--prompt is empty; pass some text, or leave --prompt out")
    return [PromptRecord(args.prompt, 0)]  # type: ignore[arg-type]


def cmd_sample(args: argparse.Namespace) -> int:
    """Run ``fastdia sample``: validate, load once, sample in batches, print."""
    from fastdia import distributed as dist
    from fastdia import ops
    from fastdia.base_model import load_base_model
    from fastdia.ops import registry
    from fastdia.pipeline import (
        build_sampler,
        resolve_checkpoint,
        sampler_config,
        sampling_settings,
    )
    from fastdia.prompts import check_chat
    from fastdia.rewards import build_rewards
    from fastdia.run_checks import check_seed
    from fastdia.sampler import sample_rows

    # 1. cheap checks, before anything heavy
    checkpoint = None if args.random_init else resolve_checkpoint(args.checkpoint)
    settings = sampling_settings(checkpoint, args.reward, **sampling_overrides(args))
    config = sampler_config(
        settings,
        rounding=args.rounding,
        clamp_from=args.clamp_from,
        backend=args.backend,
    )
    check_seed(args.seed)
    batch = args.batch_size if args.prompts_file is not None else args.num_samples
    if args.num_samples % config.particles or batch % config.particles:
        raise FastdiaError(
            f"--particles {config.particles}: --num-samples ({args.num_samples}) and "
            f"--batch-size ({args.batch_size}) must be multiples of it (each prompt's samples "
            "are its particles)"
        )
    if args.length is not None and args.new_tokens is not None:
        raise FastdiaError("give --new-tokens or the deprecated --length, not both")
    requests = _requests(args)
    if args.length is not None and len(requests) > 1:
        raise FastdiaError(
            "--length counts the prompt, so it cannot serve a prompts file; use --new-tokens"
        )
    device = default_device(args.device)
    for op in ops.SAMPLER_OPS:
        registry.resolve_backend(args.backend, op, device)
    rewards = build_rewards(args.reward)
    w = dist.world(device)  # under torchrun: this rank's share of the rows, rank 0 writes
    device = dist.rank_device(device, w)
    out_file = _open_out(args.out) if w.is_main else None

    # 2. load and build, once
    base = load_base_model(args.base_model, device=device)
    if args.chat:
        check_chat(base.tokenizer)
    new_tokens = args.new_tokens or DEFAULT_NEW_TOKENS
    if args.length is not None:
        new_tokens = _new_tokens_from_length(base, requests[0].prompt, args.length, args.chat)
    assembly = build_sampler(
        base,
        config,
        rewards=list(zip(rewards.names, rewards.weights, strict=True)),
        checkpoint=checkpoint,
        random_init=args.random_init,
        length=new_tokens,
        device=device,
        reward=lambda texts: rewards(texts)["total"],
    )
    sampler = assembly.sampler
    prompts, seeds, owners = [], [], []
    for index, req in enumerate(requests):
        base_seed = args.seed if req.seed is None else req.seed
        for i in range(args.num_samples):
            prompts.append(req.prompt)
            seeds.append((base_seed + i) % 2**31)
            owners.append((index, i))
    # a rank's rows (all of them in one process); a row's text depends on its prompt and
    # seed only, so the shares write what one process writes
    group = config.particles  # SMC: one prompt's particles stay on one rank, in one batch
    mine = [i for g in w.indices(len(prompts) // group) for i in range(g * group, (g + 1) * group)]
    prompts, seeds, owners = ([x[i] for i in mine] for x in (prompts, seeds, owners))

    # 3. sample, score, print
    many = args.prompts_file is not None
    as_json = args.json or many or args.out is not None or w.distributed
    progress = _progress(len(prompts), many and w.is_main)
    written = 0
    held: list[dict[str, Any]] = []  # a rank's records, written by rank 0 at the end

    def emit(out: Any) -> None:
        nonlocal written
        true = rewards(out.texts)
        for j, text in enumerate(out.texts):
            index, sample = owners[written + j]
            req = requests[index]
            record = {
                "prompt_index": index,
                "id": req.id,
                "prompt": req.prompt,
                "sample": sample,
                "seed": out.seeds[j],
                "text": text,
                "completion": out.completions[j],
                "completion_ids": out.completion_ids[j],
                "new_tokens": len(out.completion_ids[j]),
                "finished": out.finished[j],
                "rewards": {name: float(values[j]) for name, values in true.items()},
                "critic": {name: float(v[j]) for name, v in out.critic_values.items()},
            }
            if w.distributed:
                held.append(record)
            elif as_json:
                print(json.dumps(record), file=out_file, flush=True)
            else:
                scores = " ".join(f"{k}={v:+.3f}" for k, v in record["rewards"].items())
                print(f"[{written + j}] {scores}\n    {text}")
        written += len(out.texts)
        if progress is not None:
            progress.update(len(out.texts))
            progress.set_postfix(tok_s=f"{out.tokens_per_s:.1f}")

    delivered, seconds, result = 0, 0.0, None
    if prompts:  # a rank's share may be empty (fewer rows than ranks); rank 0's never is
        result = sample_rows(
            sampler,
            prompts,
            seeds,
            new_tokens,
            batch_size=args.batch_size if many else args.num_samples,
            chat=args.chat,
            on_batch=emit,
        )
        delivered, seconds = result.new_tokens, result.seconds
    if progress is not None:
        progress.close()
    if w.distributed:  # rank 0 writes every rank's records in row order
        shares = w.gather((held, delivered, seconds))
        dist.finish()
        if shares is None:
            return 0
        records = sorted(
            (r for part, _, _ in shares for r in part),
            key=lambda r: (r["prompt_index"], r["sample"]),
        )
        for record in records:
            print(json.dumps(record), file=out_file, flush=True)
        delivered = sum(n for _, n, _ in shares)
        seconds = max(t for _, _, t in shares)  # the ranks run side by side
    assert result is not None  # rank 0 (or the one process) sampled row 0
    backend = sampler.backends[ops.GUIDED_STEP]
    summary = {
        "tokens_per_s": delivered / seconds if seconds > 0 else float("inf"),
        "new_tokens_delivered": delivered,
        "seconds": seconds,
        "world_size": w.size,
        "backend": backend,
        "steps": config.steps,
        "rows": result.steps,
        "blocks": result.blocks,
        "block_size": sampler.block_size,
        "window": sampler.window,
        "num_prompts": len(requests),
        "num_samples": args.num_samples,
        "new_tokens": new_tokens,
        "chat": args.chat,
        "on_eos": config.on_eos,
        "sampler": config.sampler,
        "decode": config.decode,
        "stop_at": config.stop_at,
        "lm": dataclasses.asdict(config.lm),
        "guidance": config.guidance,
        "reward": rewards.spec,
        "base_model": args.base_model,
        "device": device,
        "random_init": args.random_init,
        "paths": result.paths,
    }
    if result.smc is not None:
        summary["smc"] = result.smc
    if result.mh is not None:
        summary["mh"] = {
            "steps": result.mh["steps"],
            "snr": result.mh["snr"],
            "acceptance": result.mh_acceptance,
        }
    if as_json:
        print(json.dumps({"summary": summary}), file=out_file, flush=True)
    else:
        print(
            f"{delivered} new tokens in {seconds:.2f} s "
            f"({summary['tokens_per_s']:.1f} tokens/s, backend {backend}, {device})"
        )
        if result.mh is not None:
            print(f"MALA rows: {result.mh_acceptance:.1%} of the proposed moves accepted")
    if out_file is not sys.stdout:
        out_file.close()
    return 0


def _open_out(path: str | None) -> Any:
    """``--out``'s file opened for writing (its folder made), or stdout."""
    if path is None:
        return sys.stdout
    from pathlib import Path

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("w", encoding="utf-8")
    except OSError as exc:
        raise FastdiaError(f"--out {path}: cannot write it ({exc})") from exc


def _progress(total: int, show: bool) -> Any:
    """A progress bar over ``total`` samples on stderr (prompts files only)."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", file=sys.stderr, dynamic_ncols=True)


def _new_tokens_from_length(base: Any, prompt: str | None, length: int, chat: bool) -> int:
    """The deprecated ``--length`` (prompt included) as new tokens, with a warning."""
    from fastdia.prompts import encode_prompt

    n_prompt = len(encode_prompt(base.tokenizer, base.space.vocab_size, prompt, chat=chat))
    if n_prompt >= length:
        raise FastdiaError(
            f"--prompt is {n_prompt} tokens but --length is {length}: the length counts the "
            f"prompt; use --new-tokens {max(length - n_prompt, 1)} (or more) instead"
        )
    print(
        f"fastdia sample: --length is deprecated (it counts the prompt); this run is "
        f"--new-tokens {length - n_prompt}",
        file=sys.stderr,
    )
    return length - n_prompt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdia`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except FastdiaError as exc:
        print(f"fastdia {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
