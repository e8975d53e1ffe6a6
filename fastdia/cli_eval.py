"""``fastdia eval``: fastdia's rows beside the baselines, per prompt set (see
:mod:`fastdia.evaluate`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdia.errors import ConfigError

BASELINE_TILT = 0.5  # critic-weighted decoding's weight, as in the measurement
DEFAULT_BASELINES = (
    "base@decode,best-of-4@decode,best-of-16@decode,base,best-of-4,best-of-16,"
    "tilt-only,noise-latent"
)
DRAWS = 1000
PROMPTS_PER_BATCH = 8
DEFAULT_JUDGES = "gemma3-270m,afinn"
STANDARD_TOP_P = 0.95  # the base model's top-p in the rows not matched to the decode


def add_parser(sub: Any) -> None:
    """Register the ``eval`` subcommand."""
    p = sub.add_parser("eval", help="evaluate fastdia beside the baselines on prompt sets")
    add_eval_options(p)
    p.set_defaults(func=cmd_eval)


def add_eval_options(p: argparse.ArgumentParser, *, bench: bool = False) -> None:
    """The options of ``fastdia eval`` (``bench``: those ``fastdia bench sentiment`` shares:
    the benchmark sets its own prompts, guide and samples per prompt)."""
    from fastdia.base_model import DEFAULT_BASE_MODEL
    from fastdia.cli_options import add_sampling_options

    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the demo)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    if not bench:
        p.add_argument("--guide", default="sentiment", help="reward spec whose critics guide")
    p.add_argument("--rewards", default="sentiment,nontoxic", help="true rewards to report")
    p.add_argument(
        "--lambdas",
        default=None,
        help="comma-separated guidance strengths, one fastdia row each (default: the "
        "checkpoint's guidance only)",
    )
    if not bench:
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
        default=DEFAULT_BASELINES,
        help="comma-separated baseline rows: base, best-of-N (the base model's own samples, "
        "best of N by the true reward) at T = 1, top-p 0.95; with @decode at the decode's "
        "temperature and top-p 1 (matched), with -TX[-PY] at temperature X and top-p Y; "
        "tilt-only (the LM decode with its critic tilt and no diffusion, at the decode's "
        "temperature); noise-latent (fastdia's decode reading pure noise instead of the "
        "guided latent: an ablation); critic (plain critic-weighted decoding at T = 1, "
        f"--baseline-tilt); or 'none' (default: {DEFAULT_BASELINES})",
    )
    p.add_argument(
        "--baseline-tilt",
        type=float,
        default=BASELINE_TILT,
        help="the critic row's weight on the critic's per-token values",
    )
    p.add_argument(
        "--tilt-only-tilt",
        default=None,
        help="the tilt-only row's tilt, or comma-separated tilts (one row each: its trade-off "
        "line) (default: the checkpoint's sampling.json tilt_only_tilt, chosen on the tuning "
        "prompts, else the default's tilt)",
    )
    p.add_argument(
        "--judges",
        default=DEFAULT_JUDGES,
        help="independent judges, comma-separated: gemma3-270m (perplexity under Gemma 3 "
        "270M, another family than the base model), lm:PATH (any causal LM folder), afinn "
        "(the AFINN sentiment lexicon: positive rate and reward hacking beside the reward), "
        f"or none (default: {DEFAULT_JUDGES})",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=DRAWS,
        help="bootstrap draws over prompts for the confidence intervals (95%%)",
    )
    p.add_argument(
        "--score",
        choices=("text", "continuation"),
        default="text",
        help="what the rewards and sentiment judges read: the whole text (default) or the "
        "continuation alone (the DExperts protocol)",
    )
    p.add_argument(
        "--prompts-per-batch",
        type=int,
        default=PROMPTS_PER_BATCH,
        help="prompts whose samples every method writes in one batch (fastdia's texts do not "
        "depend on it; the base model's rows draw from one stream per batch)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="eval.json", help="JSON result file (and a Markdown table beside it)"
    )
    p.add_argument("--plot", default=None, help="PNG plot file (default: --out with .png)")
    p.add_argument("--device", default=None)


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
# the denoiser's training-time switches, which an eval variant may turn off at sampling time,
# and the noise-latent ablation
_SWITCHES = ("self_condition", "clean_prompt", "time_warp", "noise_latent")


@dataclass(frozen=True)
class BaselineSpec:
    """A parsed baseline row: ``kind`` (``base``, ``best``, ``tilt-only``, ``noise-latent``,
    ``critic``), best-of ``n``, and for the base model's rows the temperature and top-p
    (None: the decode's temperature and top-p 1, ``@decode``)."""

    kind: str
    n: int | None = None
    temperature: float | None = 1.0
    top_p: float = STANDARD_TOP_P

    def at(self, decode_temperature: float) -> tuple[float, float]:
        """``(temperature, top_p)`` with ``@decode`` resolved."""
        if self.temperature is None:
            return decode_temperature, 1.0
        return self.temperature, self.top_p


def _positive_number(text: str, upper: float = math.inf) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value <= upper else None


def parse_baseline(spec: str) -> BaselineSpec | None:
    """A baseline spec (see ``--baselines``) as a :class:`BaselineSpec`, or None when it
    is not one: ``base``, ``best-of-N``, either with ``@decode`` or ``-TX`` / ``-TX-PY``;
    ``tilt-only``, ``noise-latent``, ``critic``."""
    if spec in ("tilt-only", "noise-latent", "critic"):
        return BaselineSpec(spec, temperature=None if spec != "critic" else 1.0)
    head, decode = spec, False
    if spec.endswith("@decode"):
        head, decode = spec[: -len("@decode")], True
    temperature, top_p = 1.0, STANDARD_TOP_P
    if not decode and "-T" in head:
        head, _, rest = head.partition("-T")
        t_text, sep, p_text = rest.partition("-P")
        t = _positive_number(t_text)
        p = _positive_number(p_text, 1.0) if sep else top_p
        if t is None or p is None:
            return None
        temperature, top_p = t, p
    if head == "base":
        n = None
    elif head.startswith("best-of-") and head[8:].isdigit() and int(head[8:]) >= 1:
        n = int(head[8:])
    else:
        return None
    kind = "base" if n is None else "best"
    return BaselineSpec(kind, n, None if decode else temperature, top_p)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` -> ``(NAME, {key: value})`` with numbers and booleans parsed.

    Keys are the sampling settings (``decode``, ``stop_at``, ``tilt``, ...) and
    ``guidance``, ``self_condition``, ``clean_prompt``, ``time_warp``.
    """
    from fastdia.settings import SAMPLING_KEYS

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
    from fastdia import distributed

    run_eval(args)
    distributed.finish()
    return 0


def run_eval(
    args: argparse.Namespace, sets: dict[str, list[str]] | None = None
) -> dict[str, Any] | None:
    """``fastdia eval`` with ``args`` (its options); ``sets``: prompt lists by name instead
    of ``args.prompt_sets``. Writes ``args.out`` (JSON), the Markdown table beside it and
    the plot, and returns the result. Under ``torchrun`` every rank writes its share of
    each row's prompts and rank 0 alone scores, judges and writes (the others return
    None)."""
    from fastdia import distributed
    from fastdia import evaluate as ev
    from fastdia.base_model import load_base_model
    from fastdia.cli_options import sampling_overrides
    from fastdia.device import default_device
    from fastdia.judges import load_judges, parse_judges
    from fastdia.models.checkpoint import sampling_defaults
    from fastdia.pipeline import (
        build_sampler,
        resolve_checkpoint,
        sampler_config,
        sampling_settings,
    )
    from fastdia.prompts import special_tokens
    from fastdia.rewards import build_rewards

    # cheap checks first
    lambdas = _floats(args.lambdas, "--lambdas") if args.lambdas else None
    guide, report = build_rewards(args.guide), build_rewards(args.rewards)
    if args.num_samples < 1 or args.new_tokens < 2:
        raise ConfigError("--num-samples must be >= 1 and --new-tokens >= 2")
    if args.prompts_per_batch < 1:
        raise ConfigError(f"--prompts-per-batch must be >= 1, got {args.prompts_per_batch}")
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
    default = sampling_settings(checkpoint, args.guide, **sampling_overrides(args))
    default |= {"on_eos": "mask"}
    configs: list[tuple[str, dict[str, Any]]] = []
    for lam in lambdas or [default["guidance"]]:
        tag = " (default)" if lam == default["guidance"] else ""
        configs.append((f"fastdia lambda={lam:g}{tag}", default | {"guidance": lam}))
    for text in args.variant:
        name, changes = parse_variant(text)
        configs.append((f"fastdia {name}", default | changes))
    for _, settings in configs:  # every setting checked before anything loads
        sampler_config(settings, **{k: settings[k] for k in _SWITCHES if k in settings})
    specs = [] if args.baselines == "none" else args.baselines.split(",")
    parsed = []
    for b in specs:
        spec = parse_baseline(b.strip())
        if spec is None:
            raise ConfigError(
                f"unknown baseline {b!r}; known: base, best-of-N (each with @decode, -TX or "
                "-TX-PY), tilt-only, noise-latent, critic, none"
            )
        if spec.kind in ("tilt-only", "noise-latent") and default["decode"] != "lm":
            print(
                f"fastdia eval: the {spec.kind} row is an ablation of the LM decode and this "
                "default decodes nearest: it is left out",
                file=sys.stderr,
            )
            continue
        parsed.append(spec)
    if args.draws < 1:
        raise ConfigError(f"--draws must be >= 1, got {args.draws}")
    judge_specs = parse_judges(args.judges)
    if args.tilt_only_tilt is not None:
        tilt_only = _floats(str(args.tilt_only_tilt), "--tilt-only-tilt")
    else:
        recommended = sampling_defaults(checkpoint, args.guide)
        tilt_only = [recommended.get("tilt_only_tilt", default["tilt"])]
    if sets is None:
        sets = {
            Path(s).stem if Path(s).suffix else s: ev.prompt_set(s)
            for s in args.prompt_sets.split(",")
        }
    device = default_device(args.device)
    world = distributed.world(device)
    device = distributed.rank_device(device, world)
    base = load_base_model(args.base_model, device=device)
    judges = load_judges(judge_specs, device)  # every rank scores its own prompts
    weights = list(zip(guide.names, guide.weights, strict=True))
    n, length = args.num_samples, args.new_tokens
    banned = special_tokens(
        base.tokenizer, getattr(base.model, "generation_config", None), on_eos="mask"
    ).banned
    t_decode = default["lm_temperature"]

    def score(texts: list[str]) -> Any:
        """The true guiding reward (weighted), by which best-of-N picks."""
        values = guide(texts)
        return sum(w * values[k] for k, w in weights)

    def fastdia_sampler(settings: dict[str, Any]) -> Any:
        extra = {k: settings[k] for k in _SWITCHES if k in settings}
        config = sampler_config(settings, **extra)
        return build_sampler(
            base, config, rewards=weights, checkpoint=checkpoint, device=device, reward=score
        ).sampler

    # (name, kind, settings, method, family, strength): a family's rows differ in one
    # strength (lambda, tilt, N) and make one line of the trade-off plot
    methods: list[tuple[str, str, dict[str, Any], Any, str, float | None]] = []
    for spec in parsed:
        temp, top_p = spec.at(t_decode)
        common = {"new_tokens": length, "num_samples": n}
        if spec.kind in ("base", "best"):
            kw = {"temperature": temp, "top_p": top_p, "suppress": banned}
            label = f"T={temp:g}, top-p {top_p:g}"
            if spec.kind == "base":
                method = ev.base_model_method(base, n, length, **kw)
                name = f"base model ({label})"
            else:
                method = ev.best_of_n_method(base, n, length, spec.n, score, **kw)
                name = f"best-of-{spec.n} ({label})"
            settings = {"temperature": temp, "top_p": top_p, "n": spec.n} | common
            family = f"best-of-N ({label})"
            methods.append((name, "baseline", settings, method, family, float(spec.n or 1)))
        elif spec.kind == "tilt-only":
            # the same LM decode with the latent term removed: no diffusion runs
            for tilt in tilt_only:
                settings = default | {"latent_weight": 0.0, "tilt": tilt}
                name = f"tilt-only decode (T={temp:g}, tilt {tilt:g})"
                method = ev.sampler_method(fastdia_sampler(settings), n, length)
                methods.append((name, "baseline", settings, method, "tilt-only decode", tilt))
        elif spec.kind == "noise-latent":
            settings = default | {"noise_latent": True}
            name = "fastdia, pure-noise latent (ablation)"
            method = ev.sampler_method(fastdia_sampler(settings), n, length)
            methods.append((name, "ablation", settings, method, name, None))
        else:  # critic: the base model (T = 1) with beta = --baseline-tilt x the critics'
            # per-token values as a logit bias, no tilt-once, no diffusion
            lam = default["guidance"] or 1.0
            window = fastdia_sampler(default).window
            settings = default | {
                "guidance": lam,
                "decode": "lm",
                "latent_weight": 0.0,
                "lm_temperature": 1.0,
                "tilt_once": False,
                "tilt": args.baseline_tilt * window / lam,
            }
            name = f"critic-weighted decoding (T=1, beta {args.baseline_tilt:g})"
            method = ev.sampler_method(fastdia_sampler(settings), n, length)
            methods.append((name, "baseline", settings, method, name, None))
    for name, settings in configs:
        method = ev.sampler_method(fastdia_sampler(settings), n, length)
        variant = name.startswith("fastdia lambda=")
        family = "fastdia" if variant else name
        methods.append((name, "fastdia", settings, method, family, settings["guidance"]))

    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}
        | {
            "checkpoint": str(checkpoint),
            "default_settings": default,
            "tilt_only_tilt": tilt_only,
            "prompts": sets,
        },
        "sets": {},
    }
    for set_name, prompts in sets.items():
        rows, samples = [], []
        for name, kind, settings, method, family, strength in methods:
            got = ev.evaluate_method(
                base,
                method,
                prompts,
                report,
                seed=args.seed,
                judges=judges,
                score=args.score,
                group=args.prompts_per_batch,
                world=world,
            )
            if got is None:  # another rank scores and writes
                continue
            row, per_sample = got
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "family": family,
                    "strength": strength,
                    "settings": settings,
                    **row,
                }
            )
            samples.append(per_sample)
            _print_row(set_name, rows[-1])
        if not world.is_main:
            continue
        ev.add_intervals(rows, samples, draws=args.draws, seed=args.seed)
        result["sets"][set_name] = rows
    if not world.is_main:
        return None
    result["config"]["world_size"] = world.size
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(ev.markdown_table(result, report.names[0]))
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    ev.plot(result, png, report.names[0])
    return result


def _print_row(set_name: str, row: dict[str, Any]) -> None:
    from fastdia.evaluate import format_or_na

    rw = " ".join(
        f"{k}={v['mean']:+.3f}" + (f" pos={v['positive_frac']:.0%}" if "positive_frac" in v else "")
        for k, v in row["rewards"].items()
    )
    gap = "n/a" if row["prompt_gap"] is None else f"{row['prompt_gap']:.2f}"
    judged = " ".join(
        f"{name}:" + ",".join(f"{k}={v:.3g}" for k, v in values.items())
        for name, values in row.get("judges", {}).items()
    )
    print(
        f"[{set_name}] {row['name']:<40} ppl={row['perplexity']:8.1f} "
        f"d2={row['distinct_2']:.2f} sbleu={format_or_na(row['self_bleu'], '.2f')} "
        f"degen={row['degenerate_frac']:.0%} gap={gap} "
        f"s/100tok={row['seconds_per_100_tokens']:.2f}  {rw}  {judged}",
        flush=True,
    )
