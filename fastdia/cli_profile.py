"""``fastdia profile``: every op x variant x shape, timed against the device's ceilings."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(sub: Any) -> None:
    """Register the ``profile`` subcommand."""
    p = sub.add_parser(
        "profile",
        help="time every op variant against the device's measured bandwidth and matmul rate",
        description="Time every fused op x available variant x shape; print a table and write "
        "JSON (device, versions, git sha, date, ceilings, rows). GPU timings are "
        "triton.testing.do_bench medians with inputs rotated past L2; CPU timings a timer "
        "median. On the CPU the default is --quick.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="small grid (guided_step N 64,1024; round_to_vocab N 16,64) and small ceilings "
        "(the default on the CPU)",
    )
    size.add_argument("--full", action="store_true", help="the full grid (the default on CUDA)")
    p.add_argument("--ops", type=_names, default=None, help="guided_step,round_to_vocab (all)")
    p.add_argument(
        "--variants", type=_names, default=None, help="variant names (default: all available)"
    )
    p.add_argument("--guided-step-tokens", type=_int_list, default=None, help="N values")
    p.add_argument("--round-tokens", type=_int_list, default=None, help="N values")
    p.add_argument("--dim", type=int, default=None, help="d (default 576)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 49152)")
    p.add_argument("--hidden", type=int, default=None, help="critic width H (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="guided_step L (default 32)")
    p.add_argument(
        "--dtypes", type=_names, default=["float32"], help="round_to_vocab operand dtypes"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row on the CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--out", default=None, help="JSON file (default: profile-<device>.json in the cwd)"
    )
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="read an earlier `fastdia profile` JSON instead of measuring (its table and the "
        "variant auto would take are printed)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="store the fastest variant of each op for this device model, which "
        "backend=auto then takes on it ($FASTDIA_PROFILE; GPU measurements only)",
    )
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    """Run ``fastdia profile``: measure (or read ``--from``), print the table, write the JSON,
    and with ``--record`` store each op's fastest variant for ``auto``."""
    if args.source:
        return _from_file(Path(args.source), record=args.record)
    from fastdia import ops
    from fastdia.device import default_device
    from fastdia.profile import DIM, HIDDEN, SEQ_LEN, VOCAB, default_cases, format_table, profile

    device = default_device(args.device)
    quick = args.quick or (not args.full and not device.startswith("cuda"))
    wanted = args.ops or list(ops.SAMPLER_OPS)
    unknown = [o for o in wanted if o not in ops.SAMPLER_OPS]
    if unknown:
        raise ConfigError(
            f"unknown op {unknown[0]!r} in --ops; known: {', '.join(ops.SAMPLER_OPS)}"
        )
    from fastdia.ops import registry

    known = [b for b in registry.known_backends() if b != registry.AUTO]
    for variant in args.variants or ():
        if variant not in known:
            raise ConfigError(
                f"unknown variant {variant!r} in --variants; known: {', '.join(known)}"
            )
    for name, value in (
        ("--dim", args.dim),
        ("--vocab", args.vocab),
        ("--hidden", args.hidden),
        ("--seq-len", args.seq_len),
        ("--repeats", args.repeats),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    cases = default_cases(
        quick=quick,
        guided_step_tokens=args.guided_step_tokens,
        round_to_vocab_tokens=args.round_tokens,
        dim=args.dim or DIM,
        vocab=args.vocab or VOCAB,
        hidden=args.hidden or HIDDEN,
        seq_len=args.seq_len or SEQ_LEN,
        dtypes=args.dtypes,
    )
    cases = [c for c in cases if c.op in wanted]
    payload = profile(
        device,
        cases,
        variants=args.variants,
        repeats=args.repeats or (5 if quick else 10),
        quick_ceilings=quick,
    )
    payload["config"] = {
        "command": "fastdia profile",
        "argv": {k: v for k, v in vars(args).items() if k != "func"},
        "quick": quick,
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "_", payload["environment"]["device"]).strip("_").lower()
    path = Path(args.out or f"profile-{slug}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(format_table(payload))
    print(f"wrote {path}")
    if args.record:
        _choose(payload, record=True)
    return 0


def _from_file(path: Path, *, record: bool) -> int:
    """``--from FILE``: print an earlier profile's table and auto's choice; store it with
    ``--record``."""
    from fastdia.profile import format_table

    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--from {path}: not a readable `fastdia profile` JSON ({e})") from None
    if not isinstance(payload, dict) or "rows" not in payload:
        raise ConfigError(f"--from {path}: not a `fastdia profile` JSON (no 'rows')")
    print(format_table(payload))
    _choose(payload, record=record)
    return 0


def _choose(payload: dict[str, Any], *, record: bool) -> None:
    """Print the variant of each op that ``auto`` would take on the payload's device (and
    store it with ``record``)."""
    from fastdia.ops import measured

    try:
        entries = measured.record_profile(payload, write=record)
    except ValueError as e:
        raise ConfigError(f"--record: {e}") from None
    verb = "recorded" if record else "auto would take (not recorded; add --record)"
    for op, entry in entries.items():
        print(f"{verb}: {op} -> {entry['fastest']}")
