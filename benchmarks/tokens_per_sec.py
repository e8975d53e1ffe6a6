"""Sampler throughput across backends, beside the baselines a user would pick instead.

From the repository root::

    python -m benchmarks.tokens_per_sec                 # the full grid (for a GPU)
    python -m benchmarks.tokens_per_sec --quick         # CPU: a couple of minutes

Rows, on the same base model, prompt and lengths:

* ``fastdia`` per backend: ``reference`` (eager), ``reference+compile`` (the denoiser, most
  of a step's work, under ``torch.compile``; the reference ops stay eager: their Philox
  counters are Python ints that change every step, so dynamo would recompile each step,
  and one inductor compile of the unrolled Philox takes minutes on a CPU), ``triton``,
  ``triton+graph`` and ``cuda+graph`` (the plan replayed as one CUDA graph, when
  ``SamplerConfig`` has a ``cuda_graph`` option and the variants are registered); a backend
  that cannot run here is recorded with the reason (``"skipped"``);
  each with the decode of ``--decode``: ``nearest`` (round to the nearest embedding, the
  diffusion loop alone) and ``lm`` (the base model as prior after the loop: the default
  sampling path, with the LM-decode settings of the checkpoint's ``sampling.json``, or the
  demo's under ``--random-init``; its per-token step replays as a second CUDA graph in the
  ``+graph`` rows);
* ``hf_generate``: the base model's own samples with Hugging Face ``generate`` (temperature
  1, top-p 0.95, KV cache);
* ``best_of_n``: best of ``n`` such samples per output by the true reward
  (``build_rewards("sentiment")``), scoring included.

Grid: batch in {1, 8, 64} x new tokens in {32, 128} x steps in {50, 200} (steps apply to
fastdia rows), best-of-{4, 16}; ``--quick``: batch {1, 8}, 32 new tokens, steps 50, the
reference backend, best-of-4. Every row writes ``--new-tokens`` tokens per sample after the
same prompt (fastdia in blocks of the checkpoint's block size: the default path). Every
row is timed over ``--repeats`` runs after a warm-up run (plan, compilation, autotuning and
graph capture excluded; ``torch.cuda.synchronize()`` on the GPU) and written as one JSON
line: device, versions, git sha, date, the full configuration, tokens/s (``B x new
tokens`` generated tokens over the median wall time: prompt tokens are not counted), ms
per step, peak memory (CUDA: ``max_memory_allocated`` of the row; CPU: the process's peak
RSS so far) and the command that reproduces the row. A PNG plots tokens/s against batch.

The fastdia models are untrained (``--random-init``, the default: speed does not depend on
the weights) or ``--checkpoint DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS
from fastdia import ops
from fastdia.errors import ConfigError
from fastdia.ops import registry
from fastdia.provenance import environment

log = logging.getLogger("tokens_per_sec")

PROMPT = "The movie was"
REWARD = "sentiment"
GUIDANCE = 1.0
BATCHES, NEW_TOKENS, STEPS, BEST_OF = (1, 8, 64), (32, 128), (50, 200), (4, 16)
DECODES = ("nearest", "lm")
QUICK = {"batch": (1, 8), "new_tokens": (32,), "steps": (50,), "best_of": (4,)}


@dataclasses.dataclass(frozen=True)
class Backend:
    """A fastdia configuration to time.

    Attributes:
        name: the row label.
        variant: the op variant (``SamplerConfig.backend``).
        compile: run the denoiser under ``torch.compile``.
        graph: replay the plan as a CUDA graph (``SamplerConfig.cuda_graph``).
    """

    name: str
    variant: str
    compile: bool = False
    graph: bool = False


BACKENDS = (
    Backend("reference", "reference"),
    Backend("reference+compile", "reference", compile=True),
    Backend("triton", "triton"),
    Backend("triton+graph", "triton", graph=True),
    Backend("cuda+graph", "cuda", graph=True),
)


# ---- availability ----------------------------------------------------------------------------


def _graph_option() -> bool:
    from fastdia.sampler import SamplerConfig

    return "cuda_graph" in {f.name for f in dataclasses.fields(SamplerConfig)}


def skip_reason(backend: Backend, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed on ``device`` (None: it can)."""
    if backend.graph and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if backend.graph and not _graph_option():
        return (
            "this fastdia's SamplerConfig has no cuda_graph option: its plan does not capture "
            "a CUDA graph"
        )
    if device.type == "cpu" and backend.variant in ("triton", "cuda"):
        return f"the {backend.variant} variant does not run natively on the CPU"
    for op in ops.SAMPLER_OPS:
        if backend.variant not in registry.backends(op):
            return f"no {backend.variant!r} variant of {op} is registered"
        try:
            registry.resolve_backend(backend.variant, op, device)
        except ConfigError as exc:
            return str(exc)
    return None


# ---- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process_peak_rss"


def time_runs(
    run: Callable[[int], Any], device: torch.device, repeats: int
) -> tuple[list[float], Any]:
    """Wall seconds of ``run(seed)`` for seeds ``1..repeats`` after a warm-up ``run(0)``,
    with the device synchronised around each; also the last run's result."""
    run(0)
    _sync(device)
    seconds, result = [], None
    for seed in range(1, repeats + 1):
        _sync(device)
        start = time.perf_counter()
        result = run(seed)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, result


# ---- rows ------------------------------------------------------------------------------------


def _make_plan(
    denoiser: Any,
    base: Any,
    critics: list[Any],
    config: Any,
    device: torch.device,
    batch: int,
    new_tokens: int,
) -> Any:
    from fastdia.sampler import Sampler

    sampler = Sampler(denoiser, base.space, critics, config, device=device, base_model=base)
    return sampler.plan(batch, new_tokens, prompt_tokens=len(sampler.encode(PROMPT)))


class _PlanRunner:
    """``run(seed)``: plans on the first call (the untimed warm-up), then only runs."""

    def __init__(self, make_plan: Callable[[], Any], new_tokens: int) -> None:
        self.make_plan, self.plan, self.new_tokens = make_plan, None, new_tokens

    def __call__(self, seed: int) -> Any:
        if self.plan is None:
            self.plan = self.make_plan()
        return self.plan.run(PROMPT, seed=seed, new_tokens=self.new_tokens)


def _fastdia_rows(
    args: argparse.Namespace, base: Any, device: torch.device, env: dict[str, Any]
) -> list[dict[str, Any]]:
    from fastdia.models.checkpoint import load_checkpoint
    from fastdia.pipeline import (
        DEMO_CHECKPOINT,
        random_models,
        sampler_config,
        sampling_settings,
    )
    from fastdia.sampler import WeightedCritic

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, base.space, device=device)
        denoiser, critics = ckpt.denoiser, ckpt.critics
    else:
        denoiser, critics = random_models(base, [REWARD], length=32, device=device)
    # the LM decode's weights (stop level, latent weight, tilt, LM temperature)
    lm_settings = sampling_settings(Path(args.checkpoint) if args.checkpoint else DEMO_CHECKPOINT)
    rows = []
    for backend, decode in (
        (b, d) for b in BACKENDS if b.name in args.backends for d in args.decode
    ):
        reason = skip_reason(backend, device)
        for steps in args.steps:
            for length in args.new_tokens:
                for batch in args.batch:
                    config = _row_config(
                        args, "fastdia", backend.name, batch, length, steps, decode=decode
                    )
                    if reason:
                        rows.append(_skipped(env, config, reason))
                        continue
                    # the graph option defaults to on: the eager rows turn it off
                    options: dict[str, Any] = (
                        {"cuda_graph": backend.graph} if _graph_option() else {}
                    )
                    settings = lm_settings | {"steps": steps, "guidance": GUIDANCE}
                    settings |= {"decode": "nearest", "stop_at": 0.0} if decode == "nearest" else {}
                    make_plan = functools.partial(
                        _make_plan,
                        torch.compile(denoiser) if backend.compile else denoiser,
                        base,
                        [WeightedCritic(REWARD, critics[REWARD], 1.0)],
                        sampler_config(settings, backend=backend.variant, **options),
                        device,
                        batch,
                        length,
                    )
                    rows.append(
                        _measure(
                            env,
                            config,
                            _PlanRunner(make_plan, length),
                            device,
                            args.repeats,
                            batch * length,
                            steps,
                        )
                    )
    return rows


def _baseline_rows(
    args: argparse.Namespace, base: Any, device: torch.device, env: dict[str, Any]
) -> list[dict[str, Any]]:
    from fastdia.evaluate import Method, base_model_method, best_of_n_method
    from fastdia.rewards import build_rewards

    reward = build_rewards(REWARD)

    def score(texts: list[str]) -> torch.Tensor:
        return reward(texts)["total"]

    rows = []
    for length in args.new_tokens:
        for batch in args.batch:
            methods: list[tuple[str, int | None, Method]] = []
            if "hf_generate" in args.methods:
                methods.append(("hf_generate", None, base_model_method(base, batch, length)))
            if "best_of_n" in args.methods:
                for n in args.best_of:
                    methods.append(
                        ("best_of_n", n, best_of_n_method(base, batch, length, n, score))
                    )
            for name, n, method in methods:
                config = _row_config(args, name, None, batch, length, None, n=n)
                rows.append(
                    _measure(
                        env,
                        config,
                        lambda seed, method=method: method([PROMPT], [seed]),
                        device,
                        args.repeats,
                        batch * length,
                        None,
                    )
                )
    return rows


def _row_config(
    args: argparse.Namespace,
    method: str,
    backend: str | None,
    batch: int,
    length: int,
    steps: int | None,
    *,
    n: int | None = None,
    decode: str | None = None,
) -> dict[str, Any]:
    config = {
        "method": method,
        "backend": backend,
        "decode": decode,
        "batch": batch,
        "new_tokens": length,
        "steps": steps,
        "best_of": n,
        "prompt": PROMPT,
        "reward": REWARD,
        "guidance": GUIDANCE if method == "fastdia" else None,
        "base_model": args.base_model,
        "models": (args.checkpoint or "random-init") if method == "fastdia" else None,
        "repeats": args.repeats,
        "device": str(args.device),
    }
    return config


def _command(config: dict[str, Any]) -> str:
    """The command that reproduces one row."""
    parts = ["python", "-m", "benchmarks.tokens_per_sec", "--methods", config["method"]]
    if config["backend"]:
        parts += ["--backends", config["backend"]]
    if config.get("decode"):
        parts += ["--decode", config["decode"]]
    if config["steps"]:
        parts += ["--steps", str(config["steps"])]
    if config["best_of"]:
        parts += ["--best-of", str(config["best_of"])]
    parts += ["--batch", str(config["batch"]), "--new-tokens", str(config["new_tokens"])]
    parts += ["--repeats", str(config["repeats"]), "--device", config["device"]]
    parts += ["--base-model", config["base_model"]]
    if config["models"] not in (None, "random-init"):
        parts += ["--checkpoint", config["models"]]
    return shlex.join(parts)


def _skipped(env: dict[str, Any], config: dict[str, Any], reason: str) -> dict[str, Any]:
    log.info("skip %s %s: %s", config["method"], config["backend"], reason)
    return {**_header(env), "config": config, "skipped": reason, "command": _command(config)}


def _header(env: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": env["device"],
        "git_sha": env["git_sha"],
        "date": env["date"],
        "versions": {k: env.get(k) for k in ("python", "torch", "triton", "fastdia", "cuda")},
        "environment": env,
    }


def _measure(
    env: dict[str, Any],
    config: dict[str, Any],
    run: Callable[[int], Any],
    device: torch.device,
    repeats: int,
    tokens: int,
    steps: int | None,
) -> dict[str, Any]:
    """Time one row; a failure is recorded as the row's error (the benchmark goes on)."""
    _reset_peak(device)
    row = {**_header(env), "config": config, "command": _command(config)}
    try:
        seconds, result = time_runs(run, device, repeats)
    except Exception as exc:
        log.warning("%s %s failed", config["method"], config["backend"], exc_info=True)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    median = statistics.median(seconds)
    peak, kind = _peak_memory(device)
    row.update(
        {
            "tokens_per_s": tokens / median,
            "seconds_median": median,
            "seconds": seconds,
            "ms_per_step": 1e3 * median / steps if steps else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
        }
    )
    if hasattr(result, "seconds"):  # the sampler's own time of its last run
        row["sampler_seconds"] = float(result.seconds)
        row["tokens_shape"] = list(result.tokens.shape)
    log.info(
        "%s %s B=%d new=%d steps=%s n=%s: %.1f tokens/s",
        config["method"],
        config["backend"],
        config["batch"],
        config["new_tokens"],
        config["steps"],
        config["best_of"],
        row["tokens_per_s"],
    )
    return row


# ---- plot ------------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Tokens/s against batch, one panel per new-token count, one line per method/backend/steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "tokens_per_s" in r]
    lengths = sorted({r["config"]["new_tokens"] for r in rows}) or [0]
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in timed:
            c = r["config"]
            if c["new_tokens"] != length:
                continue
            label = c["method"]
            if c["backend"] is not None:
                label = f"fastdia {c['backend']}, {c.get('decode') or 'nearest'}"
            if c["steps"]:
                label += f", {c['steps']} steps"
            if c["best_of"]:
                label += f" (N={c['best_of']})"
            lines.setdefault(label, []).append((c["batch"], r["tokens_per_s"]))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (samples)")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"{length} new tokens")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    device = rows[0]["device"] if rows else "?"
    sha = rows[0]["git_sha"] if rows else "?"
    fig.suptitle(f"fastdia throughput on {device} (git {sha})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tokens_per_sec",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the small CPU grid (see above)")
    p.add_argument("--batch", type=_ints, default=None, help="batch sizes (1,8,64)")
    p.add_argument(
        "--new-tokens", type=_ints, default=None, help="tokens generated per sample (32,128)"
    )
    p.add_argument("--steps", type=_ints, default=None, help="fastdia steps (50,200)")
    p.add_argument("--best-of", type=_ints, default=None, help="best-of-N values (4,16)")
    p.add_argument(
        "--methods",
        type=_names,
        default=["fastdia", "hf_generate", "best_of_n"],
        help="fastdia, hf_generate, best_of_n",
    )
    p.add_argument(
        "--backends",
        type=_names,
        default=None,
        help=f"fastdia backends: {', '.join(b.name for b in BACKENDS)} (--quick: reference)",
    )
    p.add_argument(
        "--decode",
        type=_names,
        default=list(DECODES),
        help="fastdia decodes: nearest (the diffusion loop alone), lm (the default sampling "
        "path: the base model as prior after the loop)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (after warm-up)")
    p.add_argument("--base-model", default="smollm2-135m", help="as for fastdia sample")
    p.add_argument("--checkpoint", default=None, help="trained models (default: random init)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON lines file (default: benchmarks/results/tokens_per_sec_<device>.jsonl); "
        "the plot goes beside it as .png",
    )
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the grid defaults (full or ``--quick``) and check the names."""
    grid = (
        QUICK
        if args.quick
        else {
            "batch": BATCHES,
            "new_tokens": NEW_TOKENS,
            "steps": STEPS,
            "best_of": BEST_OF,
        }
    )
    for key in ("batch", "new_tokens", "steps", "best_of"):
        if getattr(args, key) is None:
            setattr(args, key, list(grid[key]))
    if args.backends is None:
        args.backends = ["reference"] if args.quick else [b.name for b in BACKENDS]
    known = {b.name for b in BACKENDS}
    for name in args.backends:
        if name not in known:
            raise ConfigError(f"unknown backend {name!r}; known: {', '.join(sorted(known))}")
    for name in args.decode:
        if name not in DECODES:
            raise ConfigError(f"unknown decode {name!r}; known: {', '.join(DECODES)}")
    for name in args.methods:
        if name not in ("fastdia", "hf_generate", "best_of_n"):
            raise ConfigError(f"unknown method {name!r}; known: fastdia, hf_generate, best_of_n")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 on bad options)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from fastdia.base_model import load_base_model
    from fastdia.device import default_device

    try:
        args = _resolve(args)
        args.device = default_device(args.device)
    except ConfigError as exc:
        print(f"tokens_per_sec: error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    env = environment(device)
    base = load_base_model(args.base_model, device=device)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        if "fastdia" in args.methods:
            rows += _fastdia_rows(args, base, device, env)
        rows += _baseline_rows(args, base, device, env)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", env["device"]).strip("_").lower()
    out = Path(args.out) if args.out else RESULTS / f"tokens_per_sec_{slug}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = out.with_suffix(".png")
    plot(rows, png)
    for r in rows:
        c = r["config"]
        what = f"{c['method']:<12}{c['backend'] or '':<19}{c.get('decode') or '':<8}"
        what += f"B={c['batch']:<4}new={c['new_tokens']:<5}"
        what += f"steps={c['steps'] or '-':<5}N={c['best_of'] or '-':<4}"
        if "tokens_per_s" in r:
            step = f"{r['ms_per_step']:.2f} ms/step" if r["ms_per_step"] else ""
            print(f"{what}{r['tokens_per_s']:>10.1f} tokens/s  {step}")
        else:
            print(f"{what}  {'skipped: ' + r['skipped'] if 'skipped' in r else r['error']}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
