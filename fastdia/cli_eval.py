"""``fastdia eval``: fastdia's rows beside the baselines, per prompt set (see
:mod:`fastdia.evaluate`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError

BASELINE_TILT = 0.5  # critic-weighted decoding's weight, as in the measurement


def add_parser(sub: Any) -> None:
    """Register the ``eval`` subcommand."""
    from fastdia.base_model import DEFAULT_BASE_MODEL
    from fastdia.cli_options import add_sampling_options

    p = sub.add_parser("eval", help="evaluate fastdia beside the baselines on prompt sets")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the demo)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--guide", default="sentiment", help="reward spec whose critics guide")
    p.add_argument("--rewards", default="sentiment,nontoxic", help="true rewards to report")
    p.add_argument(
        "--lambdas",
        default=None,
        help="comma-separated guidance strengths, one fastdia row each (default: the "
        "checkpoint's guidance only)",
    )
    p.add_argument(
        "--prompt-sets",
        default="neutral,negative",
        help="comma-separated shipped sets (neutral, negative) or files, one prompt per line",
    )
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    p.add_argument(
        "--new-tokens", type=int, default=32, help="tokens every method writes after a prompt"
    )
    p.add_argument("--guidance", type=float, default=None, help="the default row's lambda")
    add_sampling_options(p)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an extra fastdia row with some settings changed, e.g. "
        "'nearest:decode=nearest,stop_at=0' or 'no-sc:self_condition=false' (repeatable)",
    )
    p.add_argument(
        "--baselines",
        default="base,best-of-4,best-of-16,critic",
        help="comma-separated baseline rows: base (T = 1), base-TX (the base model at "
        "temperature X, e.g. base-T0.8), best-of-N, best-of-N-TX, critic (or 'none')",
    )
    p.add_argument(
        "--baseline-tilt",
        type=float,
        default=BASELINE_TILT,
        help="critic-weighted decoding's weight on the critic's per-token values",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="eval.json", help="JSON result file (and a Markdown table beside it)"
    )
    p.add_argument("--plot", default=None, help="PNG plot file (default: --out with .png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"{what} must be finite numbers >= 0, got {text!r}")
    return values


_BOOL = {
    **{word: True for word in ("true", "1", "on", "yes")},
    **{word: False for word in ("false", "0", "off", "no")},
}
# the denoiser's training-time switches, which an eval variant may turn off at sampling time
_SWITCHES = ("self_condition", "clean_prompt", "time_warp")


def parse_baseline(spec: str) -> tuple[str, int | None, float] | None:
    """A baseline spec as ``(kind, n, temperature)``, or None when it is not one:
    ``base`` / ``base-TX`` (the base model at temperature 1 / X), ``best-of-N`` /
    ``best-of-N-TX`` (best of N such samples), ``critic`` (critic-weighted decoding)."""
    head, sep, temp = spec.rpartition("-T")
    if not sep:
        head, temperature = spec, 1.0
    else:
        try:
            temperature = float(temp)
        except ValueError:
            return None
        if not math.isfinite(temperature) or temperature <= 0:
            return None
    if head in ("base", "critic"):
        return (head, None, temperature) if head == "base" or not sep else None
    if head.startswith("best-of-") and head[8:].isdigit() and int(head[8:]) >= 1:
        return "best", int(head[8:]), temperature
    return None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` -> ``(NAME, {key: value})`` with numbers and booleans parsed.

    Keys are the sampling settings (``decode``, ``stop_at``, ``tilt``, ...) and
    ``guidance``, ``self_condition``, ``clean_prompt``, ``time_warp``.
    """
    from fastdia.models.checkpoint import SAMPLING_KEYS

    kinds = {k: type(spec.default) for k, spec in SAMPLING_KEYS.items()}
    kinds |= {k: bool for k in _SWITCHES}
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise ConfigError(f"--variant must look like NAME:KEY=VALUE,..., got {text!r}")
    changes: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in kinds:
            known = ", ".join(sorted(kinds))
            raise ConfigError(f"--variant {text!r}: unknown setting {key!r}; known: {known}")
        value = value.strip()
        if kinds.get(key) is bool:
            if value.lower() not in _BOOL:
                raise ConfigError(f"--variant {text!r}: {key} needs true or false")
            changes[key] = _BOOL[value.lower()]
        elif kinds.get(key) is str:
            changes[key] = value
        else:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"--variant {text!r}: {key} needs a number") from None
            changes[key] = int(number) if kinds.get(key) is int else number
    return name, changes


def cmd_eval(args: argparse.Namespace) -> int:
    from fastdia import evaluate as ev
    from fastdia.base_model import load_base_model
    from fastdia.cli_options import sampling_overrides
    from fastdia.device import default_device
    from fastdia.pipeline import (
        build_sampler,
        resolve_checkpoint,
        sampler_config,
        sampling_settings,
    )
    from fastdia.rewards import build_rewards

    # cheap checks first
    lambdas = _floats(args.lambdas, "--lambdas") if args.lambdas else None
    guide, report = build_rewards(args.guide), build_rewards(args.rewards)
    if args.num_samples < 1 or args.new_tokens < 2:
        raise ConfigError("--num-samples must be >= 1 and --new-tokens >= 2")
    if args.on_eos == "stop":
        raise ConfigError(
            "fastdia eval compares continuations of a fixed length: it masks the end tokens "
            "for every method (--on-eos mask); leave --on-eos out"
        )
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    try:  # an output that cannot be written fails now, not after the whole run
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot create its folder ({exc})") from exc
    # every method writes all its tokens: the end tokens are masked (for the baselines too)
    default = sampling_settings(checkpoint, **sampling_overrides(args)) | {"on_eos": "mask"}
    configs: list[tuple[str, dict[str, Any]]] = []
    for lam in lambdas or [default["guidance"]]:
        tag = " (default)" if lam == default["guidance"] else ""
        configs.append((f"fastdia lambda={lam:g}{tag}", default | {"guidance": lam}))
    for text in args.variant:
        name, changes = parse_variant(text)
        configs.append((f"fastdia {name}", default | changes))
    built = []
    for name, settings in configs:
        extra = {k: settings[k] for k in _SWITCHES if k in settings}
        built.append((name, settings, sampler_config(settings, **extra)))
    baselines = [] if args.baselines == "none" else args.baselines.split(",")
    for b in baselines:
        if parse_baseline(b) is None:
            raise ConfigError(
                f"unknown baseline {b!r}; known: base, base-TX (X > 0), best-of-N, "
                "best-of-N-TX, critic, none"
            )
    sets = {
        Path(s).stem if Path(s).suffix else s: ev.prompt_set(s) for s in args.prompt_sets.split(",")
    }
    device = default_device(args.device)
    base = load_base_model(args.base_model, device=device)
    weights = list(zip(guide.names, guide.weights, strict=True))
    n, length = args.num_samples, args.new_tokens
    from fastdia.prompts import special_tokens

    banned = special_tokens(
        base.tokenizer, getattr(base.model, "generation_config", None), on_eos="mask"
    ).banned

    def score(texts: list[str]) -> Any:
        """The true guiding reward (weighted), by which best-of-N picks."""
        values = guide(texts)
        return sum(w * values[k] for k, w in weights)

    methods: list[tuple[str, str, dict[str, Any], Any]] = []
    for b in baselines:
        kind, k, temp = parse_baseline(b)  # type: ignore[misc]
        if kind == "base":
            methods.append(
                (
                    "base model" if b == "base" else f"base model T={temp:g}",
                    "baseline",
                    {} if b == "base" else {"temperature": temp},
                    ev.base_model_method(base, n, length, temperature=temp, suppress=banned),
                )
            )
        elif kind == "best":
            methods.append(
                (
                    b,
                    "baseline",
                    {"n": k} | ({} if temp == 1.0 and "-T" not in b else {"temperature": temp}),
                    ev.best_of_n_method(
                        base, n, length, k, score, temperature=temp, suppress=banned
                    ),
                )
            )
    samplers = []
    for name, settings, config in built:
        assembly = build_sampler(
            base, config, rewards=weights, checkpoint=checkpoint, device=device
        )
        samplers.append((name, settings, assembly))
    if "critic" in baselines:
        # the base model (T = 1) with beta = --baseline-tilt x the critics' per-token values
        # as a logit bias: the sampler with the latent weight 0 runs no diffusion
        window = samplers[0][2].sampler.window
        lam = default["guidance"] or 1.0
        critic_settings = default | {
            "guidance": lam,
            "decode": "lm",
            "latent_weight": 0.0,
            "lm_temperature": 1.0,
            "tilt_once": False,
            "tilt": args.baseline_tilt * window / lam,
        }
        critic_sampler = build_sampler(
            base,
            sampler_config(critic_settings),
            rewards=weights,
            checkpoint=checkpoint,
            device=device,
        ).sampler
        methods.append(
            (
                f"critic-weighted decoding (tilt {args.baseline_tilt:g})",
                "baseline",
                {"tilt": args.baseline_tilt},
                ev.sampler_method(critic_sampler, n, length),
            )
        )
    for name, settings, assembly in samplers:
        methods.append((name, "fastdia", settings, ev.sampler_method(assembly.sampler, n, length)))

    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}
        | {"checkpoint": str(checkpoint), "default_settings": default, "prompts": sets},
        "sets": {},
    }
    for set_name, prompts in sets.items():
        rows = []
        for name, kind, settings, method in methods:
            row = ev.evaluate_method(base, method, prompts, report, seed=args.seed)
            rows.append({"name": name, "kind": kind, "settings": settings, **row})
            _print_row(set_name, rows[-1])
        result["sets"][set_name] = rows
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(ev.markdown_table(result, report.names[0]))
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    ev.plot(result, png, report.names[0])
    return 0


def _print_row(set_name: str, row: dict[str, Any]) -> None:
    rw = " ".join(
        f"{k}={v['mean']:+.3f}" + (f" pos={v['positive_frac']:.0%}" if "positive_frac" in v else "")
        for k, v in row["rewards"].items()
    )
    gap = "n/a" if row["prompt_gap"] is None else f"{row['prompt_gap']:.2f}"
    print(
        f"[{set_name}] {row['name']:<40} ppl={row['perplexity']:8.1f} "
        f"d2={row['distinct_2']:.2f} degen={row['degenerate_frac']:.0%} gap={gap} "
        f"s/100tok={row['seconds_per_100_tokens']:.2f}  {rw}",
        flush=True,
    )
