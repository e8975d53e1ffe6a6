"""The one table of sampling settings (:data:`SAMPLING_KEYS`): their built-in defaults,
which :class:`fastdia.sampler.SamplerConfig` and :class:`fastdia.decode.DecodeConfig` take as
their own, and the rule each value obeys; and the one check of a guidance strength.

The keys are those of a checkpoint's ``sampling.json``, of ``fastdia sample``'s options of
the same name and of ``fastdia eval --variant``. Values are checked for range where the
configs are built (their ``__post_init__``); ``sampling.json`` is checked for type when read.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fastdia.errors import ConfigError


class SamplingKey(NamedTuple):
    """One sampling setting: its built-in value and what a value must be."""

    default: Any  # used when neither sampling.json nor the command line sets it
    rule: str  # what a valid value is, for error messages


SAMPLING_KEYS: dict[str, SamplingKey] = {
    "guidance": SamplingKey(1.0, "a finite number >= 0"),
    "steps": SamplingKey(50, "a positive integer"),
    "sampler": SamplingKey("dia", "a sampler name"),
    "decode": SamplingKey("nearest", "a decode mode"),
    "stop_at": SamplingKey(0.0, "a level in [0, 1)"),
    "score_temperature": SamplingKey(1.0, "a finite number > 0"),
    "lm_temperature": SamplingKey(1.0, "a finite number > 0"),
    "latent_weight": SamplingKey(1.0, "a finite number >= 0"),
    "tilt": SamplingKey(0.0, "a finite number >= 0"),
    "tilt_once": SamplingKey(False, "true or false"),
    "tilt_horizon": SamplingKey(0, "an integer >= 0 (0: no horizon)"),
    "block_size": SamplingKey(0, "an integer >= 0 (0: half the denoiser's window)"),
    "on_eos": SamplingKey("stop", "stop or mask"),
    "critic_kind": SamplingKey("token_local", "token_local or value"),
    "adaptive_noise": SamplingKey(0.0, "a finite number >= 0"),
    "particles": SamplingKey(1, "a positive integer (1: no SMC)"),
    "ess_threshold": SamplingKey(0.5, "a finite number > 0 (at most 1)"),
    "smc_twist": SamplingKey("critic", "critic or reward"),
    "smc_reward_weight": SamplingKey(0.0, "a finite number >= 0 (0: the critics' target)"),
    "guidance_estimator": SamplingKey("critic", "critic, zo or proposal"),
    "zo_samples": SamplingKey(8, "an even integer >= 2"),
    "zo_sigma": SamplingKey(1.0, "a finite number > 0"),
    "corrector_steps": SamplingKey(0, "an integer >= 0 (0: no corrector rows)"),
    "corrector_snr": SamplingKey(0.1, "a finite number > 0"),
    "mh_steps": SamplingKey(0, "an integer >= 0 (0: no MALA rows)"),
    "mh_snr": SamplingKey(0.1, "a finite number > 0"),
}
"""The sampling settings: keys of ``sampling.json``, ``fastdia sample`` options of the same
name (``--stop-at`` for ``stop_at``) and ``fastdia eval --variant`` keys; the one list of them."""


EVAL_KEYS: dict[str, SamplingKey] = {
    "tilt_only_tilt": SamplingKey(0.0, "a finite number >= 0"),
}
"""Keys of ``sampling.json`` that only ``fastdia eval`` reads: the settings of its baselines
(``tilt_only_tilt``: the tilt of the tilt-only decode, chosen on the tuning prompts)."""


def check_guidance(value: Any) -> float:
    """``value`` as a float if it is a valid guidance strength ``lambda`` (a finite number
    >= 0), else a ConfigError that says how to steer away from a reward instead."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"guidance must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ConfigError(
            f"guidance must be >= 0, got {value}; to steer away from a reward, give it a "
            "negative weight in the reward spec instead (e.g. --reward sentiment:-1)"
        )
    return float(value)
