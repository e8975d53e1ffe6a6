"""Command-line options shared by ``fastdia sample`` and ``fastdia eval``: argument types and
the sampling options whose defaults a checkpoint's ``sampling.json`` may set."""

from __future__ import annotations

import argparse
from typing import Any

from fastdia.errors import ConfigError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def guidance_value(text: str) -> float:
    """``--guidance``: a number that :func:`fastdia.settings.check_guidance` accepts."""
    from fastdia.settings import check_guidance

    value = _number(text)
    try:
        return check_guidance(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options whose defaults a checkpoint's ``sampling.json`` may set."""
    from fastdia.decode import DECODES
    from fastdia.prompts import ON_EOS
    from fastdia.schedules import SAMPLERS

    ckpt = "default: the checkpoint's sampling.json, else"
    p.add_argument(
        "--steps", type=positive_int, default=None, help=f"reverse diffusion steps ({ckpt} 50)"
    )
    p.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)} ({ckpt} dia)")
    p.add_argument(
        "--decode",
        default=None,
        help=f"one of: {', '.join(DECODES)}: nearest embedding, or the base model as "
        f"prior ({ckpt} nearest)",
    )
    p.add_argument(
        "--stop-at",
        type=_number,
        default=None,
        help=f"noise level t* in [0, 1) where the diffusion stops and decoding starts ({ckpt} 0)",
    )
    p.add_argument(
        "--score-temperature",
        type=_number,
        default=None,
        help=f"temperature of the denoiser's token distribution ({ckpt} 1)",
    )
    p.add_argument(
        "--lm-temperature",
        type=_number,
        default=None,
        help=f"--decode lm: the base model's temperature ({ckpt} 1)",
    )
    p.add_argument(
        "--latent-weight",
        type=_number,
        default=None,
        help=f"--decode lm: weight of the latent's likelihood ({ckpt} 1)",
    )
    p.add_argument(
        "--tilt",
        type=_number,
        default=None,
        help="--decode lm: the critics' per-token values weigh tilt x guidance / window "
        f"(1: a token's weight in the latent's guidance) ({ckpt} 0)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per block: each block is one guided diffusion over the denoiser's "
        f"window, its context the tokens before it ({ckpt} half the window)",
    )
    p.add_argument(
        "--on-eos",
        choices=ON_EOS,
        default=None,
        help="stop: a sample ends at the base model's end-of-text / end-of-turn token; "
        f"mask: those tokens are never drawn, every sample has all its tokens ({ckpt} stop)",
    )
    p.add_argument(
        "--tilt-horizon",
        type=int,
        default=None,
        help="--decode lm: the tilt applies to each sample's first N generated tokens only, so "
        f"that a long text gets the tilt of an N-token one (0: no horizon) ({ckpt} 0)",
    )
    p.add_argument(
        "--critic-kind",
        choices=("token_local", "value"),
        default=None,
        help="which of the checkpoint's critics guide: token_local (critic-*: fast, fused) "
        "or value (value-*: the expected reward of the whole text given the base model's "
        f"states before the block) ({ckpt} token_local)",
    )
    p.add_argument(
        "--adaptive-noise",
        type=_number,
        default=None,
        metavar="KAPPA",
        help="adaptive noise (seed 002): each row's step noise times exp(-KAPPA h(z_t)), h "
        f"the token-local critics' value: less noise where the reward is already high ({ckpt} "
        "0, off)",
    )
    p.add_argument(
        "--particles",
        type=positive_int,
        default=None,
        help="--decode lm: twisted SMC over blocks with this many particles per prompt "
        "(each prompt's samples are its particles, resampled toward the decode's exact "
        f"tilted target; --num-samples a multiple of it) ({ckpt} 1, no SMC)",
    )
    p.add_argument(
        "--ess-threshold",
        type=_number,
        default=None,
        help="SMC: resample when the effective sample size falls under this x particles "
        f"({ckpt} 0.5)",
    )
    p.add_argument(
        "--smc-twist",
        choices=("critic", "reward"),
        default=None,
        help="SMC: what weighs the particles between blocks: critic (the critics' per-token "
        "tilt) or reward (the true reward of each particle's text so far, times "
        "--smc-reward-weight: any reward, no critic needed with --guidance 0) "
        f"({ckpt} critic)",
    )
    p.add_argument(
        "--guidance-estimator",
        choices=("critic", "zo", "proposal"),
        default=None,
        help="what gives the diffusion's guiding gradient: critic (the checkpoint's critics), "
        "zo (a zeroth-order estimate from the --reward itself: --zo-samples rounded "
        "candidates per row and step, no critic needed; slow) or proposal (the checkpoint's "
        "amortised proposal, from `fastdia train-proposal`: a network predicts the critics' "
        f"gradient) ({ckpt} critic)",
    )
    p.add_argument(
        "--zo-samples",
        type=positive_int,
        default=None,
        metavar="Q",
        help=f"zo: reward calls per row and step, an even number (antithetic pairs) ({ckpt} 8)",
    )
    p.add_argument(
        "--zo-sigma",
        type=_number,
        default=None,
        help=f"zo: the smoothing scale in embedding units (unit RMS per element) ({ckpt} 1)",
    )
    p.add_argument(
        "--corrector-steps",
        type=int,
        default=None,
        metavar="K",
        help=f"Langevin corrector rows (ULA) after each diffusion step but the last ({ckpt} 0)",
    )
    p.add_argument(
        "--corrector-snr",
        type=_number,
        default=None,
        help=f"the corrector rows' signal-to-noise ratio: step 2 snr^2 sigma^2 ({ckpt} 0.1)",
    )
    p.add_argument(
        "--mh-steps",
        type=int,
        default=None,
        metavar="K",
        help="Metropolis-adjusted Langevin (MALA) rows after each diffusion step but the "
        "last: the corrector's move, accepted or rejected against the denoiser's score and "
        f"the critics (each costs two denoiser calls) ({ckpt} 0)",
    )
    p.add_argument(
        "--mh-snr",
        type=_number,
        default=None,
        help=f"the MALA rows' signal-to-noise ratio: step 2 snr^2 sigma^2 ({ckpt} 0.1)",
    )
    p.add_argument(
        "--smc-reward-weight",
        type=_number,
        default=None,
        metavar="W",
        help="SMC: target the base model times exp(W x the true reward of the finished text): "
        "the last weighting reads the reward in place of the twist (0: the critics' target; "
        f"--smc-twist reward needs W > 0) ({ckpt} 0)",
    )
    p.add_argument(
        "--tilt-once",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--decode lm: a token earns the tilt at its first use in a continuation only, "
        f"so repeating a well-scored word gains nothing ({ckpt} off)",
    )


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line (None: not given): ``--guidance`` and
    the :func:`add_sampling_options` values."""
    from fastdia.settings import SAMPLING_KEYS

    return {k: getattr(args, k) for k in SAMPLING_KEYS}
